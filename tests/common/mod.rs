//! Test support: brokers run as real `mqtt-persist` processes on port 0, clients are rumqttc
//! over TCP, and each backend kit checks rows in its real database.
#![allow(dead_code)]

pub mod kits;
pub mod servers;
pub mod v5;

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

static UNIQUE_N: AtomicU32 = AtomicU32::new(0);

thread_local! {
    /// Set while a kit that cleans up by name is alive on this thread (see [`set_unique_tag`]).
    static UNIQUE_TAG: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// A unique name per test (and per process), for topics, client ids, databases. While a kit
/// set a tag on this thread (the Redis kit does), the name carries it, so the kit can find
/// and delete what the test stored under its names.
pub fn unique(prefix: &str) -> String {
    let n = UNIQUE_N.fetch_add(1, Ordering::Relaxed);
    match UNIQUE_TAG.with(|t| t.borrow().clone()) {
        Some(tag) => format!("{prefix}{tag}n{n}"),
        None => format!("{prefix}{}", untagged(n)),
    }
}

fn untagged(n: u32) -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros()
        % 100_000_000;
    format!("{}x{t}x{n}", std::process::id())
}

/// A fresh tag, unique across processes and kits: `k<pid>x<time>x<n>`.
pub fn fresh_tag() -> String {
    format!("k{}", untagged(UNIQUE_N.fetch_add(1, Ordering::Relaxed)))
}

/// Makes [`unique`] names on this thread carry `tag` (or nothing); returns the previous tag.
/// A test's body runs on one thread (`#[tokio::test]` blocks on it), so a kit made first in
/// the test tags every name the test makes after it.
pub fn set_unique_tag(tag: Option<String>) -> Option<String> {
    UNIQUE_TAG.with(|t| std::mem::replace(&mut *t.borrow_mut(), tag))
}

/// A broker process with its own etc/ and data/ directories.
pub struct BrokerProc {
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    child: Child,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// The `metrics.listen` port, for a broker started by [`BrokerProc::start_metered`].
    metrics: Option<u16>,
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_mqtt-persist")
}

/// Writes an etc/ dir: the broker conf (port 0, one plugin) and the plugin file.
pub fn write_etc(dir: &Path, db: &str, plugin_conf: &str, extra_broker: &str) -> PathBuf {
    let etc = dir.join("etc");
    std::fs::create_dir_all(etc.join("plugins")).unwrap();
    let main = format!("node.name = test@127.0.0.1\nlistener.tcp.external = 127.0.0.1:0\nplugins.load = {db}\ndata.dir = {}\nlog.level = {}\n{extra_broker}\n", dir.join("data").display(), std::env::var("MQTT_PERSIST_TEST_LOG").unwrap_or("info".into()));
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
        Self::spawn_in(dir, None)
    }

    /// Like [`start_with`](Self::start_with), with the Prometheus endpoint on a free port:
    /// [`metric`](Self::metric) reads it (a restart keeps the port).
    pub fn start_metered(db: &str, plugin_conf: &str, extra_broker: &str) -> BrokerProc {
        let port = servers::free_port();
        let dir = tempfile::tempdir().unwrap();
        write_etc(
            dir.path(),
            db,
            plugin_conf,
            &format!("{extra_broker}\nmetrics.listen = 127.0.0.1:{port}\n"),
        );
        Self::spawn_in(dir, Some(port))
    }

    /// The value of one series of the broker's metrics (`name{labels}`), 0 while it is absent.
    pub async fn metric(&self, series: &str) -> u64 {
        let port = self.metrics.expect("a broker started with start_metered");
        metric_value(&metrics_text(port).await, series)
    }

    fn spawn_in(dir: tempfile::TempDir, metrics: Option<u16>) -> BrokerProc {
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
        BrokerProc {
            dir,
            addr,
            child,
            log,
            metrics,
        }
    }

    /// kill -9 and start again on the same etc/ and data/.
    pub fn restart(mut self) -> BrokerProc {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The directory moves to the new process; `self` drops an empty stand-in (it used to
        // be forgotten, leaving an empty temporary directory behind per restart).
        let old = std::mem::replace(&mut self.dir, tempfile::TempDir::new().unwrap());
        let metrics = self.metrics;
        drop(self);
        Self::spawn_in(old, metrics)
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
    /// SUBACKs received so far, and SUBSCRIBEs sent.
    subacks: tokio::sync::watch::Receiver<usize>,
    subscribes: AtomicU32,
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
    let (suback_tx, subacks) = tokio::sync::watch::channel(0usize);
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
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    suback_tx.send_modify(|n| *n += 1);
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
        subacks,
        subscribes: AtomicU32::new(0),
        task,
    }
}

impl Client {
    pub async fn subscribe(&self, filter: &str, qos: QoS) {
        self.subscribes.fetch_add(1, Ordering::Relaxed);
        self.client.subscribe(filter, qos).await.unwrap();
    }

    /// Subscribes and waits for the SUBACK (of this and every earlier subscribe): from then on
    /// the router routes the filter's live traffic to this client, and the broker delivers
    /// whatever the subscription's reads find in the database before any of it.
    pub async fn subscribe_acked(&self, filter: &str, qos: QoS) {
        self.subscribe(filter, qos).await;
        let want = self.subscribes.load(Ordering::Relaxed) as usize;
        let mut acks = self.subacks.clone();
        tokio::time::timeout(Duration::from_secs(10), acks.wait_for(|n| *n >= want))
            .await
            .unwrap_or_else(|_| panic!("no SUBACK for {filter} within 10 s"))
            .expect("client connection alive");
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

    pub async fn disconnect(self) {
        let _ = self.client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }

    /// Drop the TCP connection without DISCONNECT.
    pub fn abort(self) {
        self.task.abort();
    }
}

/// A raw v3.1.1 connection: CONNECT written by rumqttd's own codec.
pub async fn raw_connect(
    addr: std::net::SocketAddr,
    id: &str,
    keepalive: u16,
    will: Option<rumqttd::protocol::LastWill>,
) -> tokio::net::TcpStream {
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    raw_handshake(s, id, keepalive, will).await
}

/// A raw v3.1.1 connection whose socket receives into a tiny buffer (no autotuning): while
/// the test does not read, the broker can write only that much (plus its own send buffer) to
/// it, and a larger write of the broker's blocks until the test reads.
pub async fn raw_connect_small_window(addr: std::net::SocketAddr, id: &str) -> tokio::net::TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let s = sock.connect(addr).await.unwrap();
    raw_handshake(s, id, 30, None).await
}

async fn raw_handshake(
    mut s: tokio::net::TcpStream,
    id: &str,
    keepalive: u16,
    will: Option<rumqttd::protocol::LastWill>,
) -> tokio::net::TcpStream {
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

/// The broker's Prometheus page on `127.0.0.1:port` (`metrics.listen`), status line included.
pub async fn metrics_text(port: u16) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// The value of `series` (`name{labels}`, exactly as rendered) in a metrics page; 0 when absent.
pub fn metric_value(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .map(|v| v.trim().parse().unwrap_or_else(|_| panic!("{series}: not a number: {v}")))
        .unwrap_or(0)
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

/// True (and says so on stderr) when the suite was told to skip `db`; the test then returns.
/// Otherwise the test goes on and fails loudly if the server is unreachable.
pub fn skip(db: &str, what: &str) -> bool {
    let skip = skipped(db);
    if skip {
        eprintln!("SKIPPED: {db} {what} (MQTT_PERSIST_SKIP)");
    }
    skip
}

/// Backends the suite was told to skip: `MQTT_PERSIST_SKIP=pgsql,redis`.
pub fn skipped(db: &str) -> bool {
    std::env::var("MQTT_PERSIST_SKIP")
        .unwrap_or_default()
        .split(',')
        .any(|s| s.trim() == db)
}

/// A raw MQTT 5 connection whose CONNACK (a success) was read. rumqttd's codec only decodes
/// what a server receives, so the CONNACK is skipped by its length.
pub async fn raw_v5_connect(addr: SocketAddr, id: &str) -> tokio::net::TcpStream {
    use rumqttd::protocol::v5::V5;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut buf = bytes::BytesMut::new();
    let hello = rumqttd::protocol::Connect {
        keep_alive: 30,
        client_id: id.into(),
        clean_session: true,
    };
    V5.write(rumqttd::protocol::Packet::Connect(hello, None, None, None, None), &mut buf)
        .unwrap();
    s.write_all(&buf).await.unwrap();
    let mut head = [0u8; 2];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut head))
        .await
        .expect("CONNACK")
        .unwrap();
    assert_eq!(head[0], 0x20, "CONNACK");
    let mut body = vec![0u8; head[1] as usize];
    s.read_exact(&mut body).await.unwrap();
    assert_eq!(body[1], 0, "CONNACK success");
    s
}

/// The next packet a raw MQTT 5 connection receives (acks; not CONNACK, see above).
pub async fn read_v5(s: &mut tokio::net::TcpStream, rbuf: &mut bytes::BytesMut) -> rumqttd::protocol::Packet {
    use rumqttd::protocol::v5::V5;
    loop {
        match V5.read_mut(rbuf, 1 << 20) {
            Ok(p) => return p,
            Err(rumqttd::protocol::Error::InsufficientBytes(_)) => {
                tokio::time::timeout(Duration::from_secs(10), s.read_buf(rbuf))
                    .await
                    .expect("a packet")
                    .unwrap();
            }
            Err(e) => panic!("{e}"),
        }
    }
}
