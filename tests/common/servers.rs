//! Throwaway database servers for fault tests: each test starts its own instance on a free
//! port with its own data dir, and kills only that instance — never the machine's services.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_port(port: u16, up: bool, wait: Duration) {
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() == up {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("port {port} did not become {}", if up { "reachable" } else { "closed" });
}

/// Runs a command as the `postgres` user when we are root (PostgreSQL refuses root).
fn pg_cmd(bin: &str) -> Command {
    let dir = std::fs::read_dir("/usr/lib/postgresql").expect("PostgreSQL server binaries (apt install postgresql)");
    let mut versions: Vec<PathBuf> = dir.filter_map(|e| e.ok().map(|e| e.path())).collect();
    versions.sort();
    let path = versions.last().expect("a PostgreSQL version").join("bin").join(bin);
    if unsafe_is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(path);
        c
    } else {
        Command::new(path)
    }
}

fn unsafe_is_root() -> bool {
    std::env::var("USER").map(|u| u == "root").unwrap_or(false)
        || Command::new("id")
            .arg("-u")
            .output()
            .map(|o| o.stdout.starts_with(b"0"))
            .unwrap_or(false)
}

pub struct PgServer {
    pub port: u16,
    dir: PathBuf,
    /// Extra `postgres` options (TLS files).
    opts: String,
    _tmp: tempfile::TempDir,
}

impl PgServer {
    pub fn start() -> PgServer {
        Self::start_with(|_| String::new())
    }

    /// A server that also accepts TLS, with this certificate and key.
    pub fn start_tls(cert: &std::path::Path, key: &std::path::Path) -> PgServer {
        Self::start_with(|dir| {
            // In the server's own directory, owned by it: PostgreSQL refuses a key others can read.
            for (from, name) in [(cert, "server.crt"), (key, "server.key")] {
                std::fs::copy(from, dir.join(name)).unwrap();
                if unsafe_is_root() {
                    Command::new("chown").arg("postgres:postgres").arg(dir.join(name)).status().unwrap();
                }
            }
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.join("server.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
            format!(
                " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                dir.join("server.crt").display(),
                dir.join("server.key").display()
            )
        })
    }

    fn start_with(opts: impl FnOnce(&std::path::Path) -> String) -> PgServer {
        let tmp = tempfile::Builder::new().prefix("mp-pg").tempdir_in("/tmp").unwrap();
        let dir = tmp.path().join("data");
        std::fs::create_dir_all(&dir).unwrap();
        if unsafe_is_root() {
            Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(tmp.path())
                .status()
                .unwrap();
        }
        let st = pg_cmd("initdb")
            .args(["-A", "trust", "-U", "root", "-E", "UTF8", "-D"])
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "initdb failed");
        let port = free_port();
        let opts = opts(&dir);
        let s = PgServer {
            port,
            dir,
            opts,
            _tmp: tmp,
        };
        s.resume();
        s
    }

    /// Start (again) on the same data dir and port.
    pub fn resume(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off{}",
            self.port,
            self.dir.display(),
            self.opts
        );
        let log = self.dir.join("log");
        let mut started = false;
        for _ in 0..20 {
            let st = pg_cmd("pg_ctl")
                .args(["-D"])
                .arg(&self.dir)
                .args(["-o", &opts, "-l"])
                .arg(&log)
                .args(["-w", "start"])
                .stdout(Stdio::null())
                .status()
                .unwrap();
            if st.success() {
                started = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        assert!(
            started,
            "pg_ctl start failed: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        wait_port(self.port, true, Duration::from_secs(20));
    }

    /// kill -9 the postmaster (and so the server).
    pub fn kill(&self) {
        let pid = std::fs::read_to_string(self.dir.join("postmaster.pid")).unwrap();
        let pid = pid.lines().next().unwrap().trim().to_string();
        // The whole server at once: backends too, so a quick restart finds no shared memory
        // still attached by orphans.
        Command::new("kill").args(["-STOP", &pid]).status().unwrap();
        let _ = Command::new("pkill").args(["-9", "-P", &pid]).status();
        Command::new("kill").args(["-9", &pid]).status().unwrap();
        wait_port(self.port, false, Duration::from_secs(10));
        // Orphaned backends exit once they notice; remove the stale pid file for a clean restart.
        std::thread::sleep(Duration::from_millis(300));
        // Remove the stale locks too: a killed, not yet reaped postmaster still "owns" them,
        // and a restart would wait for it.
        let _ = std::fs::remove_file(self.dir.join("postmaster.pid"));
        let _ = std::fs::remove_file(self.dir.join(format!(".s.PGSQL.{}.lock", self.port)));
        let _ = std::fs::remove_file(self.dir.join(format!(".s.PGSQL.{}", self.port)));
    }

    /// SIGSTOP the whole server: it keeps its connections and port but answers nothing, as a
    /// hung server or a network partition would.
    pub fn freeze(&self) {
        self.signal_all("-STOP");
    }

    pub fn thaw(&self) {
        self.signal_all("-CONT");
    }

    fn signal_all(&self, sig: &str) {
        let pid = std::fs::read_to_string(self.dir.join("postmaster.pid")).unwrap();
        let pid = pid.lines().next().unwrap().trim().to_string();
        Command::new("kill").args([sig, &pid]).status().unwrap();
        let _ = Command::new("pkill").args([sig, "-P", &pid]).status();
    }

    pub fn url(&self) -> String {
        format!("postgres://root@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ = pg_cmd("pg_ctl")
            .args(["-D"])
            .arg(&self.dir)
            .args(["-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A throwaway redis-server with an fsync-always AOF, so a kill -9 loses nothing acknowledged.
pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    /// Extra `redis-server` arguments (TLS).
    args: Vec<String>,
    child: Option<std::process::Child>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        Self::start_with(Vec::new())
    }

    /// A server that speaks only TLS on its port, with this certificate and key.
    pub fn start_tls(cert: &std::path::Path, key: &std::path::Path) -> RedisServer {
        let args = ["--tls-port", "{port}", "--port", "0", "--tls-auth-clients", "no", "--tls-cert-file"]
            .iter()
            .map(|a| a.to_string())
            .chain([cert.display().to_string(), "--tls-key-file".into(), key.display().to_string()])
            .collect();
        Self::start_with(args)
    }

    fn start_with(args: Vec<String>) -> RedisServer {
        let mut s = RedisServer {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            args,
            child: None,
        };
        s.resume();
        s
    }

    pub fn resume(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
            ])
            .arg(self.dir.path())
            .args(self.args.iter().map(|a| a.replace("{port}", &self.port.to_string())))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server installed");
        self.child = Some(child);
        wait_port(self.port, true, Duration::from_secs(20));
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        wait_port(self.port, false, Duration::from_secs(10));
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Redis Sentinel (redis-server --sentinel) watching one master under `name`.
pub struct SentinelServer {
    pub port: u16,
    _dir: tempfile::TempDir,
    child: std::process::Child,
}

impl SentinelServer {
    pub fn start(master_port: u16, name: &str) -> SentinelServer {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        // Sentinel rewrites its conf file, so it gets its own.
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!("port {port}\nbind 127.0.0.1\nsentinel monitor {name} 127.0.0.1 {master_port} 1\nsentinel down-after-milliseconds {name} 1000\n"),
        )
        .unwrap();
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server installed");
        wait_port(port, true, Duration::from_secs(20));
        SentinelServer { port, _dir: dir, child }
    }
}

impl Drop for SentinelServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
