//! The conf system from the outside: `mqtt-persist check` and `run` on good and bad files.

mod common;

use common::*;
use std::process::Command;

fn check(etc: &std::path::Path) -> (bool, String) {
    let out = Command::new(bin()).args(["check", "--etc"]).arg(etc).output().unwrap();
    (
        out.status.success(),
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    )
}

const POOL: &str = "backend.sqlite.pool1.path = data/x.db\n";

fn etc_with(rule_lines: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let etc = write_etc(dir.path(), "sqlite", &format!("{POOL}{rule_lines}"), "");
    (dir, etc)
}

#[test]
fn the_shipped_configuration_is_valid() {
    let etc = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("etc");
    let (ok, out) = check(&etc);
    assert!(ok, "{out}");
    assert!(out.contains("configuration ok"), "{out}");
}

#[test]
fn a_misspelled_function_names_file_line_and_the_fix() {
    let (_d, etc) = etc_with(
        "\n# comment\nbackend.sqlite.hook.session.subscribed.1 = {\"action\": {\"function\": \"on_mesage_fetch\"}, \"pool\": \"pool1\"}\n",
    );
    let (ok, out) = check(&etc);
    assert!(!ok);
    assert!(
        out.contains("emqx_backend_sqlite.conf:4: unknown function `on_mesage_fetch` (did you mean `on_message_fetch`?)"),
        "{out}"
    );
}

#[test]
fn a_rule_naming_a_missing_pool_is_an_error() {
    let (_d, etc) =
        etc_with("backend.sqlite.hook.message.publish.1 = {\"action\": {\"function\": \"on_message_publish\"}, \"pool\": \"pool2\"}\n");
    let (ok, out) = check(&etc);
    assert!(!ok);
    assert!(out.contains("emqx_backend_sqlite.conf:2: unknown pool `pool2`"), "{out}");
}

#[test]
fn bad_json_is_an_error_with_its_line() {
    let (_d, etc) =
        etc_with("backend.sqlite.hook.message.publish.1 = {\"action\": {\"function\": \"on_message_publish\"}, \"pool\": \"pool1\"\n");
    let (ok, out) = check(&etc);
    assert!(!ok);
    assert!(out.contains("emqx_backend_sqlite.conf:2: invalid JSON value"), "{out}");
}

#[test]
fn an_unknown_placeholder_is_an_error() {
    let (_d, etc) = etc_with(
        "backend.sqlite.hook.message.publish.1 = {\"action\": {\"sql\": [\"insert into t values (${clientd})\"]}, \"pool\": \"pool1\"}\n",
    );
    let (ok, out) = check(&etc);
    assert!(!ok);
    assert!(
        out.contains("emqx_backend_sqlite.conf:2:")
            && out.contains("unknown placeholder `${clientd}`")
            && out.contains("did you mean `clientid`"),
        "{out}"
    );
}

#[test]
fn a_placeholder_from_another_hook_is_an_error() {
    let (_d, etc) = etc_with(
        "backend.sqlite.hook.client.connected.1 = {\"action\": {\"sql\": [\"insert into t values (${payload})\"]}, \"pool\": \"pool1\"}\n",
    );
    let (ok, out) = check(&etc);
    assert!(!ok);
    assert!(out.contains("not available on hook client.connected"), "{out}");
}

#[test]
fn a_function_on_the_wrong_hook_is_an_error() {
    let (_d, etc) =
        etc_with("backend.sqlite.hook.message.publish.1 = {\"action\": {\"function\": \"on_message_fetch\"}, \"pool\": \"pool1\"}\n");
    let (ok, out) = check(&etc);
    assert!(!ok);
    assert!(out.contains("belongs to hook session.subscribed"), "{out}");
}

#[test]
fn unknown_keys_and_malformed_lines_are_errors() {
    let (_d, etc) = etc_with("backend.sqlite.pool1.pathh = x\nthis is not a setting\n");
    let (ok, out) = check(&etc);
    assert!(!ok);
    assert!(
        out.contains("conf:2: unknown sqlite pool setting `pathh` (did you mean `path`?)"),
        "{out}"
    );
    assert!(out.contains("conf:3: expected `key = value`"), "{out}");
}

#[test]
fn run_refuses_a_bad_configuration_naming_file_and_line() {
    let (_d, etc) =
        etc_with("backend.sqlite.hook.message.publish.1 = {\"action\": {\"function\": \"on_message_publsh\"}, \"pool\": \"pool1\"}\n");
    let out = Command::new(bin()).args(["run", "--etc"]).arg(&etc).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("emqx_backend_sqlite.conf:2: unknown function `on_message_publsh`"),
        "{err}"
    );
}

#[test]
fn environment_overrides_reach_the_configuration() {
    let (_d, etc) = etc_with("");
    let out = Command::new(bin())
        .args(["check", "--etc"])
        .arg(&etc)
        .env("MQTT_PERSIST__PLUGINS__LOAD", "sqlite,nosuchdb")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("env MQTT_PERSIST__PLUGINS__LOAD: unknown backend `nosuchdb`"), "{err}");
}

#[test]
fn a_taken_port_is_a_one_line_error_naming_the_flag() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (_d, etc) = etc_with("");
    let out = Command::new(bin())
        .args(["run", "--etc"])
        .arg(&etc)
        .args(["--listen", &addr])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err
        .lines()
        .find(|l| l.contains("address already in use"))
        .unwrap_or_else(|| panic!("{err}"));
    assert!(line.contains(&addr) && line.contains("--listen"), "{line}");
}

#[test]
fn schema_print_shows_the_tables() {
    let out = Command::new(bin()).args(["schema", "print", "sqlite"]).output().unwrap();
    assert!(out.status.success());
    let s = String::from_utf8_lossy(&out.stdout);
    for t in ["mqtt_client", "mqtt_sub", "mqtt_msg", "mqtt_retain", "mqtt_acked"] {
        assert!(s.contains(&format!("CREATE TABLE IF NOT EXISTS {t}")), "{t}");
    }
}
