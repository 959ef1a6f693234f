//! Broker memory (BENCHMARKS.md, issue 19): the RSS of the broker process alone, ours (`mqtt-persist
//! run`, no backend) and Mosquitto's (`mosquitto -p`, stock settings) side by side, each started
//! fresh for each scenario, driven by the same clients from this process.

use super::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

/// A broker process under test; killed when dropped.
struct Proc {
    child: std::process::Child,
    addr: SocketAddr,
    _dir: Option<tempfile::TempDir>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Resident memory of process `pid` in kB (4 kB pages).
fn rss_kb_of(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/statm")).unwrap_or_default();
    s.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()).unwrap_or(0) * 4
}

impl Proc {
    fn rss_kb(&self) -> u64 {
        rss_kb_of(self.child.id())
    }
}

fn ours(extra: &str) -> Proc {
    let (dir, _) = conf_dir(None, extra);
    let mut child = Command::new(env!("CARGO_BIN_EXE_mqtt-persist"))
        .args(["run", "--etc"])
        .arg(dir.path().join("etc"))
        .env("RUST_LOG", std::env::var("BENCH_BROKER_LOG").unwrap_or("info,rumqttd=warn".into()))
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mqtt-persist");
    let (tx, rx) = std::sync::mpsc::channel();
    for out in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Some(i) = line.find("mqtt-persist listening on ") {
                    let _ = tx.send(line[i + 26..].split_whitespace().next().unwrap_or("").to_string());
                } else if line.contains("WARN") || line.contains("ERROR") || std::env::var("BENCH_BROKER_LOG").is_ok() {
                    eprintln!("broker: {line}");
                }
            }
        });
    }
    let addr = rx.recv_timeout(Duration::from_secs(30)).expect("broker address").parse().unwrap();
    Proc {
        child,
        addr,
        _dir: Some(dir),
    }
}

fn mosquitto() -> Option<Proc> {
    let port = free_port();
    let child = Command::new("mosquitto")
        .args(["-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let p = Proc { child, addr, _dir: None };
    for _ in 0..100 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return Some(p);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// Lets this process hold many sockets (the clients of the idle scenario).
fn raise_nofile() {
    // SAFETY: plain libc calls on a local struct.
    unsafe {
        let mut l = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

/// Bytes of broker RSS per idle connection, `n` connections.
async fn idle(b: &Proc, n: usize) -> f64 {
    let before = b.rss_kb();
    let mut conns = Vec::with_capacity(n);
    for chunk in 0..n.div_ceil(500) {
        let addr = b.addr;
        let batch = (chunk * 500..((chunk + 1) * 500).min(n)).map(|i| async move { Raw::connect(addr, &format!("idle-{i}")).await });
        conns.extend(futures::future::join_all(batch).await);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = b.rss_kb();
    drop(conns);
    (after.saturating_sub(before) * 1024) as f64 / n as f64
}

/// `filters` publishers → `filters` subscribers, one filter each, `per` QoS 1 messages each
/// (window 100): broker RSS in MiB before, at its peak, and 2 s after the last delivery.
async fn fan(b: &Proc, filters: usize, per: u64) -> (f64, f64, f64) {
    let tag = mqtt_persist::model::now_ms();
    let before = b.rss_kb();
    let mut subs = Vec::new();
    for i in 0..filters {
        let mut s = Raw::connect(b.addr, &format!("fan-sub-{i}")).await;
        s.subscribe(&format!("mem/{tag}/{i}/#"), RQoS::AtLeastOnce).await;
        subs.push(s);
    }
    let pid = b.child.id();
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss_kb_of(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let epoch = Instant::now();
    let waiting: Vec<_> = subs.into_iter().map(|s| tokio::spawn(subscriber(s, per, epoch, None))).collect();
    let mut pubs = Vec::new();
    for i in 0..filters {
        let p = Raw::connect(b.addr, &format!("fan-pub-{i}")).await;
        let topic = format!("mem/{tag}/{i}/t");
        pubs.push(tokio::spawn(async move { publisher(p, &topic, per, 1, 100, None, epoch).await }));
    }
    for p in pubs {
        p.await.unwrap();
    }
    eprintln!("published in {:?}", epoch.elapsed());
    for s in waiting {
        s.await.unwrap();
    }
    eprintln!("delivered in {:?}", epoch.elapsed());
    tokio::time::sleep(Duration::from_secs(2)).await;
    sampler.abort();
    let mib = |kb: u64| kb as f64 / 1024.0;
    (mib(before), mib(peak.load(Ordering::Relaxed)), mib(b.rss_kb()))
}

/// A persistent QoS 1 subscriber that reads `read_rate` msg/s while `pub_rate` msg/s are
/// published to it for `secs`: what it received, whether the broker disconnected it (and
/// when), and the broker's peak RSS in MiB.
async fn slow(b: &Proc, read_rate: u64, pub_rate: u64, secs: u64) -> (u64, Option<f64>, f64) {
    let topic = format!("mem/slow/{}", mqtt_persist::model::now_ms());
    let mut sub = Raw::connect_session(b.addr, "slow-sub", false).await;
    sub.subscribe(&topic, RQoS::AtLeastOnce).await;
    let p = Raw::connect(b.addr, "slow-pub").await;
    let epoch = Instant::now();
    let t = topic.clone();
    let publishing = tokio::spawn(async move { publisher(p, &t, pub_rate * secs, 1, 100, Some(pub_rate), epoch).await });
    let mut got = 0u64;
    let mut peak = 0u64;
    let mut closed = None;
    let pace = Duration::from_micros(1_000_000 / read_rate);
    let end = epoch + Duration::from_secs(secs);
    let mut ack = BytesMut::new();
    while Instant::now() < end {
        // One message at a time, acked, then the pause that makes the reader slow.
        let hdr = wire::peek_publish(&sub.r);
        match V4.read_mut(&mut sub.r, 1 << 20) {
            Ok(Packet::Publish(..)) => {
                if let Some((1, pkid)) = hdr {
                    V4.write(
                        Packet::PubAck(
                            PubAck {
                                pkid,
                                reason: PubAckReason::Success,
                            },
                            None,
                        ),
                        &mut ack,
                    )
                    .unwrap();
                    let _ = sub.s.write_all(&ack).await;
                    ack.clear();
                }
                got += 1;
                peak = peak.max(b.rss_kb());
                tokio::time::sleep(pace).await;
            }
            Ok(_) => {}
            Err(rumqttd::protocol::Error::InsufficientBytes(_)) => {
                match tokio::time::timeout(Duration::from_secs(1), sub.s.read_buf(&mut sub.r)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => {
                        closed = Some(epoch.elapsed().as_secs_f64());
                        break;
                    }
                    _ => {}
                }
            }
            Err(e) => panic!("{e}"),
        }
    }
    publishing.abort();
    (got, closed, peak as f64 / 1024.0)
}

pub async fn memory() {
    raise_nofile();
    let n = 10_000;
    let env = |k: &str, d: u64| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let (filters, per) = (env("BENCH_FILTERS", 100) as usize, env("BENCH_PER", 20_000));
    let ours_idle = if std::env::var("BENCH_SKIP_IDLE").is_ok() {
        f64::NAN
    } else {
        idle(&ours(""), n).await
    };
    let mosq = mosquitto();
    let mosq_idle = match mosq.as_ref().filter(|_| ours_idle.is_finite()) {
        Some(m) => idle(m, n).await,
        None => f64::NAN,
    };
    drop(mosq);
    row(
        &format!("{n} idle connections, broker RSS per connection"),
        "mqtt-persist",
        ours_idle,
        "mosquitto",
        mosq_idle,
        "B",
    );
    let conf = std::env::var("BENCH_OURS_CONF").unwrap_or_default().replace(';', "\n");
    let (b0, b1, b2) = fan(&ours(&conf), filters, per).await;
    let (m0, m1, m2) = match mosquitto() {
        Some(m) => fan(&m, filters, per).await,
        None => (f64::NAN, f64::NAN, f64::NAN),
    };
    if std::env::var("BENCH_SKIP_SLOW").is_err() {
        let secs = env("BENCH_SLOW_SECS", 60);
        let (og, oc, op) = slow(&ours(&conf), 100, 10_000, secs).await;
        let (mg, mc, mp) = match mosquitto() {
            Some(m) => slow(&m, 100, 10_000, secs).await,
            None => (0, None, f64::NAN),
        };
        let said = |c: Option<f64>| c.map_or("never disconnected".to_string(), |t| format!("disconnected at {t:.0} s"));
        println!(
            "| persistent QoS1 subscriber reading 100 msg/s, 10k msg/s published to it for {secs} s | mqtt-persist: got {og}, {}, RSS peak {op:.0} MiB | mosquitto: got {mg}, {}, RSS peak {mp:.0} MiB | – |",
            said(oc),
            said(mc)
        );
    }
    println!(
        "| {filters} pubs → {filters} subs, one filter each, {per} QoS1 {PAYLOAD} B messages each, broker RSS before / peak / after | mqtt-persist: {b0:.0} / {b1:.0} / {b2:.0} MiB (growth {:.0}) | mosquitto: {m0:.0} / {m1:.0} / {m2:.0} MiB (growth {:.0}) | – |",
        b2 - b0,
        m2 - m0
    );
}
