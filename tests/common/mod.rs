//! Test support: brokers run as real `mqtt-persist` processes on port 0, clients are rumqttc
//! over TCP, and each backend kit checks rows in its real database.
#![allow(dead_code)]

pub mod kits;
pub mod servers;

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use rumqttd::protocol::{v4::V4, Protocol};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// A unique name per test (and per process), for topics, client ids, databases.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros()
        % 100_000_000;
    format!("{prefix}{}x{t}x{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// A broker process with its own etc/ and data/ directories.
pub struct BrokerProc {
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    child: Child,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_mqtt-persist")
}

/// Writes an etc/ dir: the broker conf (port 0, one plugin) and the plugin file.
pub fn write_etc(dir: &Path, db: &str, plugin_conf: &str, extra_broker: &str) -> PathBuf {
    let etc = dir.join("etc");
    std::fs::create_dir_all(etc.join("plugins")).unwrap();
    let main = format!("node.name = test@127.0.0.1\nlistener.tcp.external = 127.0.0.1:0\nplugins.load = {db}\ndata.dir = {}\nlog.level = info\n{extra_broker}\n", dir.join("data").display());
    std::fs::write(etc.join("mqtt-persist.conf"), main).unwrap();
    std::fs::write(etc.join("plugins").join(format!("emqx_backend_{db}.conf")), plugin_conf).unwrap();
    etc
}

impl BrokerProc {
    pub fn start(db: &str, plugin_conf: &str) -> BrokerProc {
        Self::start_with(db, plugin_conf, "")
    }

    pub fn start_with(db: &str, plugin_conf: &str, extra_broker: &str) -> BrokerProc {
        let dir = tempfile::tempdir().unwrap();
        write_etc(dir.path(), db, plugin_conf, extra_broker);
        Self::spawn_in(dir)
    }

    fn spawn_in(dir: tempfile::TempDir) -> BrokerProc {
        let mut child = Command::new(bin())
            .args(["run", "--etc"])
            .arg(dir.path().join("etc"))
            .env("RUST_LOG", "info,rumqttd=warn")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn mqtt-persist");
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        for out in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let log = log.clone();
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if let Some(i) = line.find("mqtt-persist listening on ") {
                        let addr = line[i + 26..].split_whitespace().next().unwrap_or("").to_string();
                        let _ = tx.send(addr);
                    }
                    log.lock().unwrap().push(line);
                }
            });
        }
        let addr = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(a) => a.parse().expect("address in log"),
            Err(_) => {
                let _ = child.kill();
                std::thread::sleep(Duration::from_millis(200));
                panic!("broker did not start:\n{}", log.lock().unwrap().join("\n"));
            }
        };
        BrokerProc { dir, addr, child, log }
    }

    /// kill -9 and start again on the same etc/ and data/.
    pub fn restart(mut self) -> BrokerProc {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let dir = tempfile::TempDir::new().unwrap();
        let old = std::mem::replace(&mut self.dir, dir);
        std::mem::forget(self);
        Self::spawn_in(old)
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: &str) {
        assert!(Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status()
            .unwrap()
            .success());
    }

    /// Waits for the process to exit; returns its success.
    pub fn wait_exit(&mut self, wait: Duration) -> Option<bool> {
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st.success());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for BrokerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A connected rumqttc client whose incoming publishes arrive on `rx`.
pub struct Client {
    pub client: AsyncClient,
    pub rx: mpsc::UnboundedReceiver<rumqttc::Publish>,
    pub session_present: bool,
    task: tokio::task::JoinHandle<()>,
}

pub async fn connect(addr: SocketAddr, id: &str, clean: bool) -> Client {
    let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_clean_session(clean);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_max_packet_size(1 << 20, 1 << 20);
    connect_with(o).await
}

pub async fn connect_with(opts: MqttOptions) -> Client {
    let (client, mut el): (AsyncClient, EventLoop) = AsyncClient::new(opts, 1000);
    let (tx, rx) = mpsc::unbounded_channel();
    let (ctx, crx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let mut ctx = Some(ctx);
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(c))) => {
                    if let Some(t) = ctx.take() {
                        let _ = t.send(c.session_present);
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = tx.send(p);
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    let session_present = tokio::time::timeout(Duration::from_secs(10), crx)
        .await
        .expect("CONNACK within 10 s")
        .expect("connection failed");
    Client {
        client,
        rx,
        session_present,
        task,
    }
}

impl Client {
    pub async fn subscribe(&self, filter: &str, qos: QoS) {
        self.client.subscribe(filter, qos).await.unwrap();
    }

    pub async fn publish(&self, topic: &str, qos: QoS, retain: bool, payload: impl Into<Vec<u8>>) {
        self.client.publish(topic, qos, retain, payload.into()).await.unwrap();
    }

    /// Exactly `n` publishes within `wait`, then nothing more for a short while.
    pub async fn expect(&mut self, n: usize, wait: Duration) -> Vec<rumqttc::Publish> {
        let mut out = Vec::new();
        let deadline = Instant::now() + wait;
        while out.len() < n {
            match tokio::time::timeout_at(deadline.into(), self.rx.recv()).await {
                Ok(Some(p)) => out.push(p),
                _ => panic!(
                    "expected {n} publishes, got {}: {:?}",
                    out.len(),
                    out.iter().map(|p| (&p.topic, p.payload.clone())).collect::<Vec<_>>()
                ),
            }
        }
        if let Ok(Some(p)) = tokio::time::timeout(Duration::from_millis(400), self.rx.recv()).await {
            panic!("expected exactly {n} publishes, got one more: {} {:?}", p.topic, p.payload);
        }
        out
    }

    /// The next publish, whatever follows it.
    pub async fn next(&mut self, wait: Duration) -> rumqttc::Publish {
        match tokio::time::timeout(wait, self.rx.recv()).await {
            Ok(Some(p)) => p,
            _ => panic!("no publish within {wait:?}"),
        }
    }

    /// Nothing arrives within `wait`.
    pub async fn expect_none(&mut self, wait: Duration) {
        if let Ok(Some(p)) = tokio::time::timeout(wait, self.rx.recv()).await {
            panic!("expected no publish, got {} {:?}", p.topic, p.payload);
        }
    }

    pub async fn disconnect(self) {
        let _ = self.client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }

    /// Drop the TCP connection without DISCONNECT.
    pub fn abort(self) {
        self.task.abort();
    }
}

/// The broker's Prometheus page on `127.0.0.1:port` (`metrics.listen`), status line included.
/// A raw v3.1.1 connection: CONNECT written by rumqttd's own codec.
pub async fn raw_connect(
    addr: std::net::SocketAddr,
    id: &str,
    keepalive: u16,
    will: Option<rumqttd::protocol::LastWill>,
) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut buf = bytes::BytesMut::new();
    let c = rumqttd::protocol::Connect {
        keep_alive: keepalive,
        client_id: id.into(),
        clean_session: true,
    };
    V4.write(rumqttd::protocol::Packet::Connect(c, None, will, None, None), &mut buf)
        .unwrap();
    s.write_all(&buf).await.unwrap();
    let mut ack = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut ack))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ack, [0x20, 2, 0, 0], "CONNACK success");
    s
}

/// A QoS 1 subscription filter for a raw SUBSCRIBE.
pub fn v4_filter(path: &str) -> rumqttd::protocol::Filter {
    rumqttd::protocol::Filter {
        path: path.into(),
        qos: rumqttd::protocol::QoS::AtLeastOnce,
        nolocal: false,
        preserve_retain: false,
        retain_forward_rule: rumqttd::protocol::RetainForwardRule::OnEverySubscribe,
    }
}

/// `packets` encoded back to back, to be sent in one write (so the broker reads them at once).
pub fn v4_bytes(packets: Vec<rumqttd::protocol::Packet>) -> Vec<u8> {
    let mut buf = bytes::BytesMut::new();
    for p in packets {
        V4.write(p, &mut buf).unwrap();
    }
    buf.to_vec()
}

pub async fn metrics_text(port: u16) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// Poll `f` until it returns Some, or panic after `wait` with `what`.
pub async fn eventually<T, F, Fut>(what: &str, wait: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + wait;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Backends the suite was told to skip: `MQTT_PERSIST_SKIP=pgsql,redis`.
pub fn skipped(db: &str) -> bool {
    std::env::var("MQTT_PERSIST_SKIP")
        .unwrap_or_default()
        .split(',')
        .any(|s| s.trim() == db)
}
