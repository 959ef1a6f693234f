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

/// An EMQX 4.x emqx_backend_pgsql.conf as its docs ship it, including the 3.x-era keys.
const EMQX4_PGSQL: &str = r##"
## PostgreSQL server
backend.pgsql.pool1.server = 127.0.0.1:5432
backend.pgsql.pool1.pool_size = 8
backend.pgsql.pool1.username = root
backend.pgsql.pool1.password = public
backend.pgsql.pool1.database = mqtt
backend.pgsql.pool1.ssl = false

## Max number of fetch offline messages. Without count limit if infinity
backend.pgsql.max_returned_count = 500
## Time Range. Without time limit if infinity
backend.pgsql.time_range = 2h

backend.pgsql.hook.client.connected.1    = {"action": {"function": "on_client_connected"}, "pool": "pool1"}
backend.pgsql.hook.session.created.1     = {"action": {"function": "on_subscribe_lookup"}, "pool": "pool1"}
backend.pgsql.hook.client.disconnected.1 = {"action": {"function": "on_client_disconnected"}, "pool": "pool1"}
backend.pgsql.hook.session.subscribed.1  = {"topic": "#", "action": {"function": "on_message_fetch"}, "pool": "pool1", "offline_opts": {"max_returned_count": 500, "time_range": "2h"}}
backend.pgsql.hook.session.subscribed.2  = {"topic": "#", "action": {"function": "on_retain_lookup"}, "pool": "pool1"}
backend.pgsql.hook.session.unsubscribed.1= {"topic": "#", "action": {"sql": ["delete from mqtt_acked where clientid = ${clientid} and topic = ${topic}"]}, "pool": "pool1"}
backend.pgsql.hook.message.publish.1     = {"topic": "#", "action": {"function": "on_message_publish"}, "pool": "pool1"}
backend.pgsql.hook.message.publish.2     = {"topic": "#", "action": {"function": "on_message_retain"}, "pool": "pool1"}
backend.pgsql.hook.message.publish.3     = {"topic": "#", "action": {"function": "on_retain_delete"}, "pool": "pool1"}
backend.pgsql.hook.message.acked.1       = {"topic": "#", "action": {"function": "on_message_acked"}, "pool": "pool1"}
backend.pgsql.hook.message.deliver.1     = {"topic": "#", "action": {"function": "on_message_delivered"}, "pool": "pool1"}
"##;

#[test]
fn an_emqx4_pgsql_file_loads_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let etc = write_etc(dir.path(), "pgsql", EMQX4_PGSQL, "");
    let (ok, out) = check(&etc);
    assert!(ok, "{out}");
    assert!(out.contains("11 rule(s)"), "{out}");
    assert!(!out.contains("public"), "the password must never be printed: {out}");
}

#[test]
fn the_shipped_pgsql_file_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let shipped =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("etc/plugins/emqx_backend_pgsql.conf")).unwrap();
    let etc = write_etc(dir.path(), "pgsql", &shipped, "");
    let (ok, out) = check(&etc);
    assert!(ok, "{out}");
}

#[test]
fn check_connect_reports_an_unreachable_pool_without_its_password() {
    let conf =
        "backend.pgsql.pool1.server = 127.0.0.1:1\nbackend.pgsql.pool1.password = s3cr3t-pw\nbackend.pgsql.pool1.connect_timeout = 1000\n";
    let (ok, text) = check_connect("pgsql", conf, "");
    assert!(!ok, "{text}");
    assert!(text.contains("pgsql:pool1") && text.contains("error"), "{text}");
    assert!(!text.contains("s3cr3t-pw"), "password leaked: {text}");
}

/// `mqtt-persist check --connect` on a fresh etc/ with this plugin conf: (success, all output).
fn check_connect(db: &str, plugin_conf: &str, extra_broker: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let etc = write_etc(dir.path(), db, plugin_conf, extra_broker);
    let out = Command::new(bin())
        .args(["check", "--connect", "--etc"])
        .arg(&etc)
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// EMQX 4.x's shipped emqx_backend_redis.conf rule set.
const EMQX4_REDIS: &str = r##"
backend.redis.pool1.type = single
backend.redis.pool1.server = 127.0.0.1:6379
backend.redis.pool1.pool_size = 8
backend.redis.pool1.database = 0
backend.redis.pool1.channel = mqtt_channel
backend.redis.hook.client.connected.1 = {"action": {"function": "on_client_connected"}, "pool": "pool1"}
backend.redis.hook.session.created.1 = {"action": {"function": "on_subscribe_lookup"}, "pool": "pool1"}
backend.redis.hook.client.disconnected.1 = {"action": {"function": "on_client_disconnected"}, "pool": "pool1"}
backend.redis.hook.session.subscribed.1 = {"topic": "queue/#", "action": {"function": "on_message_fetch_for_queue"}, "pool": "pool1"}
backend.redis.hook.session.subscribed.2 = {"topic": "pubsub/#", "action": {"function": "on_message_fetch_for_pubsub"}, "pool": "pool1"}
backend.redis.hook.session.subscribed.3 = {"action": {"function": "on_retain_lookup"}, "pool": "pool1"}
backend.redis.hook.session.unsubscribed.1= {"topic": "#", "action": {"commands": ["DEL mqtt:acked:${clientid}:${topic}"]}, "pool": "pool1"}
backend.redis.hook.message.publish.1 = {"topic": "#", "action": {"function": "on_message_publish"}, "expired_time" : 3600, "pool": "pool1"}
backend.redis.hook.message.publish.2 = {"topic": "#", "action": {"function": "on_message_retain"}, "expired_time" : 3600, "pool": "pool1"}
backend.redis.hook.message.publish.3 = {"topic": "#", "action": {"function": "on_retain_delete"}, "pool": "pool1"}
backend.redis.hook.message.acked.1 = {"topic": "queue/#", "action": {"function": "on_message_acked_for_queue"}, "pool": "pool1"}
backend.redis.hook.message.acked.2 = {"topic": "pubsub/#", "action": {"function": "on_message_acked_for_pubsub"}, "pool": "pool1"}
"##;

#[test]
fn an_emqx4_redis_file_loads_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let etc = write_etc(dir.path(), "redis", EMQX4_REDIS, "");
    let (ok, out) = check(&etc);
    assert!(ok, "{out}");
    assert!(out.contains("12 rule(s)"), "{out}");
}

#[test]
fn the_shipped_redis_file_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let shipped =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("etc/plugins/emqx_backend_redis.conf")).unwrap();
    let etc = write_etc(dir.path(), "redis", &shipped, "");
    let (ok, out) = check(&etc);
    assert!(ok, "{out}");
}

#[test]
fn a_redis_command_with_an_unknown_placeholder_names_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let conf = "backend.redis.pool1.server = 127.0.0.1:6379\nbackend.redis.hook.message.publish.1 = {\"action\": {\"commands\": [\"RPUSH q:${topc} ${payload}\"]}, \"pool\": \"pool1\"}\n";
    let etc = write_etc(dir.path(), "redis", conf, "");
    let (ok, out) = check(&etc);
    assert!(!ok);
    assert!(
        out.contains("emqx_backend_redis.conf:2:") && out.contains("unknown placeholder `${topc}`"),
        "{out}"
    );
}

/// An etc/ for `db` whose plugin file is `pool_line` (line 1) then `rule_lines` (from line 2).
fn db_etc_with(db: &str, pool_line: &str, rule_lines: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let etc = write_etc(dir.path(), db, &format!("{pool_line}\n{rule_lines}"), "");
    (dir, etc)
}

/// `check` fails, and for each `(line, text)` one line of its output holds
/// `emqx_backend_<db>.conf:<line>: ` and `text`.
fn assert_errors_at(db: &str, etc: &std::path::Path, expected: &[(u32, &str)]) {
    let (ok, out) = check(etc);
    assert!(!ok, "{out}");
    for (line, text) in expected {
        let at = format!("emqx_backend_{db}.conf:{line}: ");
        assert!(
            out.lines().any(|l| l.contains(&at) && l.contains(text)),
            "expected `{at}…{text}` in:\n{out}"
        );
    }
}

#[test]
fn function_next_to_a_statement_list_is_an_error() {
    let (_d, etc) = etc_with(concat!(
        r#"backend.sqlite.hook.message.publish.1 = {"action": {"function": "on_message_publish", "sql": ["insert into t values (${clientid})"]}, "pool": "pool1"}"#,
        "\n",
        r#"backend.sqlite.hook.message.publish.2 = {"action": {"cql": ["insert into t values (${clientid})"], "function": "on_message_publish"}, "pool": "pool1"}"#,
        "\n",
        r#"backend.sqlite.hook.message.publish.3 = {"action": {"commands": ["SET k ${payload}"]}, "pool": "pool1"}"#,
        "\n",
    ));
    assert_errors_at(
        "sqlite",
        &etc,
        &[
            (
                2,
                "`action` has both `function` and `sql`, which are exclusive: keep `function` to run the builtin, or `sql` to run your own statements (one rule each)",
            ),
            (3, "`action` has both `function` and `cql`, which are exclusive"),
            (4, "`action.commands` is not for sqlite rules: write `sql` (or `function`)"),
        ],
    );
}

#[test]
fn max_returned_count_out_of_range_or_zero_is_an_error() {
    let (_d, etc) = etc_with(concat!(
        r#"backend.sqlite.hook.session.subscribed.1 = {"action": {"function": "on_message_fetch"}, "pool": "pool1", "offline_opts": {"max_returned_count": 4294967297}}"#,
        "\n",
        r#"backend.sqlite.hook.session.subscribed.2 = {"action": {"function": "on_message_fetch"}, "pool": "pool1", "offline_opts": {"max_returned_count": 0}}"#,
        "\n",
        r#"backend.sqlite.hook.session.subscribed.3 = {"action": {"function": "on_message_fetch"}, "pool": "pool1", "offline_opts": {"max_returned_count": -1}}"#,
        "\n",
        "backend.sqlite.max_returned_count = 4294967296\n",
    ));
    assert_errors_at(
        "sqlite",
        &etc,
        &[
            (
                2,
                "`max_returned_count` = 4294967297 is out of range: at most 4294967295, or \"infinity\" for no limit",
            ),
            (
                3,
                "`max_returned_count` = 0 would deliver no offline messages: write a count of at least 1, or \"infinity\" for no limit",
            ),
            (
                4,
                "`max_returned_count` must be an integer in 1..=4294967295 or \"infinity\" (no limit), found `-1`",
            ),
            (5, "`max_returned_count` = 4294967296 is out of range"),
        ],
    );
}

#[test]
fn max_returned_count_infinity_means_no_limit() {
    let (_d, etc) = etc_with(concat!(
        "backend.sqlite.max_returned_count = infinity\n",
        r#"backend.sqlite.hook.session.subscribed.1 = {"action": {"function": "on_message_fetch"}, "pool": "pool1", "offline_opts": {"max_returned_count": "infinity"}}"#,
        "\n",
    ));
    let (ok, out) = check(&etc);
    assert!(ok, "{out}");
}

#[test]
fn overflowing_durations_and_sizes_are_errors() {
    let (_d, etc) = etc_with(concat!(
        "backend.sqlite.time_range = 300000000000000d\n",
        "backend.sqlite.message_ttl = 18446744073709551616s\n",
        "backend.sqlite.spool.max_size = 17179869184GB\n",
        r#"backend.sqlite.hook.session.subscribed.1 = {"action": {"function": "on_message_fetch"}, "pool": "pool1", "offline_opts": {"time_range": "9300000000000000s"}}"#,
        "\n",
    ));
    assert_errors_at(
        "sqlite",
        &etc,
        &[
            (
                2,
                "duration `300000000000000d` is too large: at most 9223372036854775s; write `infinity` for no limit",
            ),
            (3, "duration `18446744073709551616s` is too large"),
            (
                4,
                "`spool.max_size` = `17179869184GB` is too large: at most 18446744073709551615 bytes",
            ),
            (5, "duration `9300000000000000s` is too large"),
        ],
    );
}

#[test]
fn a_non_positive_expired_time_is_an_error() {
    let (_d, etc) = db_etc_with(
        "redis",
        "backend.redis.pool1.server = 127.0.0.1:6379",
        concat!(
            r#"backend.redis.hook.message.publish.1 = {"action": {"function": "on_message_publish"}, "expired_time": 0, "pool": "pool1"}"#,
            "\n",
            r#"backend.redis.hook.message.publish.2 = {"action": {"function": "on_message_retain"}, "expired_time": -5, "pool": "pool1"}"#,
            "\n",
            r#"backend.redis.hook.message.publish.3 = {"action": {"function": "on_retain_delete"}, "expired_time": 1.5, "pool": "pool1"}"#,
            "\n",
        ),
    );
    assert_errors_at(
        "redis",
        &etc,
        &[
            (
                2,
                "`expired_time` must be a positive integer (seconds), found 0: omit it for the default, 7200",
            ),
            (3, "`expired_time` must be a positive integer (seconds), found -5"),
            (4, "`expired_time` must be a positive integer (seconds), found 1.5"),
        ],
    );
}

#[test]
fn sqlite_statements_with_quoted_or_commented_placeholders_or_hand_written_parameters_are_errors() {
    let (_d, etc) = etc_with(concat!(
        r#"backend.sqlite.hook.message.publish.1 = {"action": {"sql": ["insert into t(c) values ('${clientid}')"]}, "pool": "pool1"}"#,
        "\n",
        r#"backend.sqlite.hook.message.publish.2 = {"action": {"sql": ["insert into t(c) values (${clientid}) -- from ${topic}"]}, "pool": "pool1"}"#,
        "\n",
        r#"backend.sqlite.hook.message.publish.3 = {"action": {"sql": ["insert into t(c) values (?)"]}, "pool": "pool1"}"#,
        "\n",
        r#"backend.sqlite.hook.message.publish.4 = {"action": {"sql": ["insert /* ${payload} */ into t(c) values (${clientid})"]}, "pool": "pool1"}"#,
        "\n",
        r#"backend.sqlite.hook.message.publish.5 = {"action": {"sql": ["insert into `t` (`${topic}`) values (1)"]}, "pool": "pool1"}"#,
        "\n",
    ));
    assert_errors_at(
        "sqlite",
        &etc,
        &[
            (
                2,
                "placeholder `${clientid}` is inside a quoted string ('…'): write it bare (`${clientid}`), values are always bound as parameters",
            ),
            (
                3,
                "placeholder `${topic}` is inside a `--` comment, where the database never sees its parameter: move it out of the comment or delete it",
            ),
            (
                4,
                "hand-written parameter `?`: write a `${name}` placeholder instead (e.g. `${clientid}`), bind parameters come only from placeholders",
            ),
            (5, "placeholder `${payload}` is inside a `/* */` comment"),
            (6, "placeholder `${topic}` is inside backticks (`…`)"),
        ],
    );
}

const PG_POOL: &str = "backend.pgsql.pool1.server = 127.0.0.1:5432";

#[test]
fn pgsql_statements_with_quoted_placeholders_or_hand_written_parameters_are_errors() {
    let (_d, etc) = db_etc_with(
        "pgsql",
        PG_POOL,
        concat!(
            r#"backend.pgsql.hook.message.publish.1 = {"action": {"sql": ["insert into t values ($1, ${clientid})"]}, "pool": "pool1"}"#,
            "\n",
            r#"backend.pgsql.hook.message.publish.2 = {"action": {"sql": ["insert into t values ($body$ ${payload} $body$)"]}, "pool": "pool1"}"#,
            "\n",
            r#"backend.pgsql.hook.message.publish.3 = {"action": {"sql": ["select \"${clientid}\" from t"]}, "pool": "pool1"}"#,
            "\n",
            r#"backend.pgsql.hook.message.publish.4 = {"action": {"sql": ["insert into t values (E'\\'${clientid}')"]}, "pool": "pool1"}"#,
            "\n",
        ),
    );
    assert_errors_at(
        "pgsql",
        &etc,
        &[
            (2, "hand-written parameter `$1`: write a `${name}` placeholder instead"),
            (
                3,
                "placeholder `${payload}` is inside a dollar-quoted string ($body$…$body$): write it bare (`${payload}`)",
            ),
            (4, "placeholder `${clientid}` is inside double quotes (\"…\")"),
            (5, "placeholder `${clientid}` is inside a quoted string ('…')"),
        ],
    );
}

#[test]
fn legitimate_pgsql_statements_still_load() {
    let (_d, etc) = db_etc_with(
        "pgsql",
        PG_POOL,
        concat!(
            r#"backend.pgsql.hook.message.publish.1 = {"action": {"sql": ["insert into t(a) values (${clientid}) on conflict do nothing"]}, "pool": "pool1"}"#,
            "\n",
            r#"backend.pgsql.hook.message.publish.2 = {"action": {"sql": ["update t set n = n + 1 where doc ? 'key' and q = ${qos}::int -- count it"]}, "pool": "pool1"}"#,
            "\n",
            r#"backend.pgsql.hook.message.publish.3 = {"action": {"sql": ["insert into t values ('it''s', E'\\'', $$ $1 ? $$, ${payload})"]}, "pool": "pool1"}"#,
            "\n",
        ),
    );
    let (ok, out) = check(&etc);
    assert!(ok, "{out}");
    assert!(out.contains("3 rule(s)"), "{out}");
}

#[test]
fn other_wrong_values_in_a_rule_are_errors() {
    let (_d, etc) = etc_with(concat!(
        r#"backend.sqlite.hook.message.publish.1 = {"action": {"sql": []}, "pool": "pool1"}"#,
        "\n",
        r#"backend.sqlite.hook.message.publish.2 = {"action": {"function": "on_message_publish", "pool": "pool1"}}"#,
        "\n",
        r#"backend.sqlite.hook.message.publish.3 = {"action": {"function": "on_message_publish"}, "pool": 1}"#,
        "\n",
        r#"backend.sqlite.hook.message.publish.4 = {"action": {"sql": 5}, "pool": "pool1"}"#,
        "\n",
        r#"backend.sqlite.hook.session.subscribed.1 = {"action": {"function": "on_message_fetch"}, "pool": "pool1", "offline_opts": {"time_rang": "2h"}}"#,
        "\n",
        r#"backend.sqlite.hook.message.publish.5 = {"action": {"functon": "on_message_publish"}, "pool": "pool1"}"#,
        "\n",
    ));
    assert_errors_at(
        "sqlite",
        &etc,
        &[
            (2, "`action.sql` is empty: list at least one statement, or use `function`"),
            (3, "`pool` belongs to the rule, not inside `action`: move it next to `action`"),
            (4, "`pool` must be a string naming a configured pool, found 1"),
            (5, "`action.sql` must be a list of strings, found 5"),
            (6, "unknown field `time_rang` in offline_opts (did you mean `time_range`?)"),
            (
                7,
                "unknown field `functon` in `action` (did you mean `function`?): expected `function` or `sql`",
            ),
        ],
    );
}

#[test]
fn a_redis_pipeline_without_commands_is_an_error() {
    let (_d, etc) = db_etc_with(
        "redis",
        "backend.redis.pool1.server = 127.0.0.1:6379",
        concat!(
            r#"backend.redis.hook.message.publish.1 = {"action": {"commands": ["pipeline"]}, "pool": "pool1"}"#,
            "\n"
        ),
    );
    assert_errors_at(
        "redis",
        &etc,
        &[(2, "`action.commands` holds only \"pipeline\": list the commands to send after it")],
    );
}

#[test]
fn the_compose_environment_configures_the_shipped_files() {
    // Every MQTT_PERSIST__ override of docker/compose.yml, applied to the shipped etc/.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let compose = std::fs::read_to_string(root.join("docker/compose.yml")).unwrap();
    let vars: Vec<(String, String)> = compose
        .lines()
        .filter_map(|l| l.trim().split_once(": "))
        .filter(|(k, _)| k.starts_with("MQTT_PERSIST__"))
        .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
        .collect();
    assert!(vars.len() >= 8, "{vars:?}");
    let out = Command::new(bin())
        .args(["check", "--etc"])
        .arg(root.join("etc"))
        .envs(vars)
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    assert!(text.contains("2 backend(s)"), "{text}");
}

/// A CA, and a server certificate it signed for `localhost` only, made with the openssl CLI.
fn make_certs(dir: &std::path::Path, ca_name: &str) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let subj = format!("/CN={ca_name}");
    run(&[
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", &subj,
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    std::fs::write(dir.join("san.cnf"), "subjectAltName=DNS:localhost\n").unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "san.cnf",
    ]);
}

/// A directory with a CA named `name` and a server certificate it signed for `localhost`.
fn test_ca(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path(), name);
    dir
}

#[test]
fn postgres_tls_modes_check_what_they_promise() {
    if skip("pgsql", "TLS test") {
        return;
    }
    let (certs, other) = (test_ca("mqtt-persist test CA"), test_ca("some other CA"));
    let pg = common::servers::PgServer::start_tls(&certs.path().join("server.crt"), &certs.path().join("server.key"));
    let probe = |host: &str, tls: &str| {
        let conf = format!(
            "backend.pgsql.pool1.server = {host}:{}\nbackend.pgsql.pool1.username = root\nbackend.pgsql.pool1.database = postgres\nbackend.pgsql.pool1.connect_timeout = 3000\n{tls}",
            pg.port
        );
        check_connect("pgsql", &conf, "")
    };
    let ca = format!("backend.pgsql.pool1.cacertfile = {}\n", certs.path().join("ca.crt").display());
    let wrong_ca = format!("backend.pgsql.pool1.cacertfile = {}\n", other.path().join("ca.crt").display());

    // `ssl = on`: chain and name. The certificate names localhost, not 127.0.0.1.
    let (ok, text) = probe("localhost", &format!("backend.pgsql.pool1.ssl = on\n{ca}"));
    assert!(ok, "verify-full by the certificate's name: {text}");
    let (ok, text) = probe("127.0.0.1", &format!("backend.pgsql.pool1.ssl = on\n{ca}"));
    assert!(
        !ok && text.contains("error"),
        "a name the certificate does not hold must be refused: {text}"
    );
    let (ok, text) = probe("localhost", &format!("backend.pgsql.pool1.ssl = on\n{wrong_ca}"));
    assert!(!ok, "a certificate from another CA must be refused: {text}");
    // verify-ca: the chain, not the name.
    let (ok, text) = probe("127.0.0.1", &format!("backend.pgsql.pool1.ssl_mode = verify-ca\n{ca}"));
    assert!(ok, "verify-ca ignores the name: {text}");
    let (ok, text) = probe("127.0.0.1", &format!("backend.pgsql.pool1.ssl_mode = verify-ca\n{wrong_ca}"));
    assert!(!ok, "verify-ca still checks the chain: {text}");
    // require: encrypted, the certificate unchecked (libpq's meaning), no CA file needed.
    let (ok, text) = probe("127.0.0.1", "backend.pgsql.pool1.ssl_mode = require\n");
    assert!(ok, "require encrypts without verifying: {text}");
}

#[test]
fn ssl_mode_require_fails_against_a_server_without_tls() {
    if skip("pgsql", "TLS test") {
        return;
    }
    let pg = common::servers::PgServer::start();
    let conf = format!(
        "backend.pgsql.pool1.server = 127.0.0.1:{}\nbackend.pgsql.pool1.username = root\nbackend.pgsql.pool1.database = postgres\nbackend.pgsql.pool1.ssl_mode = require\n",
        pg.port
    );
    let (ok, text) = check_connect("pgsql", &conf, "");
    assert!(!ok, "TLS was required, the server has none: {text}");
    let (ok, text) = check_connect("pgsql", &conf.replace("ssl_mode = require", "ssl_mode = prefer"), "");
    assert!(ok, "prefer falls back to plain: {text}");
}

#[test]
fn redis_tls_checks_the_servers_certificate() {
    if skip("redis", "TLS test") {
        return;
    }
    let (certs, other) = (test_ca("mqtt-persist test CA"), test_ca("some other CA"));
    let redis = common::servers::RedisServer::start_tls(&certs.path().join("server.crt"), &certs.path().join("server.key"));
    let probe = |host: &str, ca: &std::path::Path| {
        let conf = format!(
            "backend.redis.pool1.server = {host}:{}\nbackend.redis.pool1.ssl = on\nbackend.redis.pool1.cafile = {}\n",
            redis.port,
            ca.display()
        );
        check_connect("redis", &conf, "persist.write_timeout = 3000")
    };
    let (ok, text) = probe("localhost", &certs.path().join("ca.crt"));
    assert!(ok, "TLS with the right CA and name: {text}");
    let (ok, text) = probe("localhost", &other.path().join("ca.crt"));
    assert!(
        !ok && text.contains("error"),
        "a certificate from another CA must be refused: {text}"
    );
    let (ok, text) = probe("127.0.0.1", &certs.path().join("ca.crt"));
    assert!(
        !ok && text.contains("error"),
        "a name the certificate does not hold must be refused: {text}"
    );
}

#[test]
fn template_errors_come_in_one_list_with_the_other_errors() {
    // A rule's statements are compiled by its backend, after the conf is parsed: their errors
    // still join the rest, so one `check` shows everything to fix.
    let (_d, etc) = etc_with(concat!(
        "backend.sqlite.hook.message.publish.1 = {\"topic\": \"#\", \"action\": {\"sql\": [\"insert into t values (${clientd})\"]}, \"pool\": \"pool1\"}\n",
        "backend.sqlite.hook.message.publish.2 = {\"topic\": \"#\", \"action\": {\"function\": \"on_mesage_publish\"}, \"pool\": \"pool1\"}\n",
    ));
    assert_errors_at(
        "sqlite",
        &etc,
        &[(2, "unknown placeholder `${clientd}`"), (3, "unknown function `on_mesage_publish`")],
    );
    let (_, out) = check(&etc);
    assert!(out.contains("configuration has 2 error(s)"), "{out}");
}
