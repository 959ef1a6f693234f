//! The dead-letter file, `<data.dir>/dead-letter.jsonl`: writes that no database accepted but
//! that must not be lost. MQTT 3.1.1 has no negative acknowledgement, so a v3.1.1 publisher
//! whose message a database refused is acked only once the message is here; spooled writes
//! (acked when they reached the spool) that a database refuses on replay land here too.
//!
//! One JSON object per line, synced to disk before the ack goes out; payloads are base64.
//! Each record has `at` (ms), `reason`, and either `message` (what the client published) or
//! `pool` and `op` (a spooled write).

use crate::metrics::Registry;
use crate::ratelimit::RateLimited;
use parking_lot::Mutex;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

pub struct DeadLetter {
    path: PathBuf,
    file: Mutex<Option<std::fs::File>>,
    metrics: Arc<Registry>,
}

impl DeadLetter {
    pub fn new(path: PathBuf, metrics: Arc<Registry>) -> Arc<DeadLetter> {
        Arc::new(DeadLetter {
            path,
            file: Mutex::new(None),
            metrics,
        })
    }

    /// Appends one record with `at` and `reason` added, synced to disk. Counted, and logged at
    /// most once per second. An error means the record is not safe: the caller must not ack.
    pub fn record(&self, reason: &str, mut record: serde_json::Map<String, serde_json::Value>) -> std::io::Result<()> {
        record.insert("at".into(), crate::model::now_ms().into());
        record.insert("reason".into(), reason.into());
        let mut line = serde_json::to_vec(&record).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let r = {
            let mut f = self.file.lock();
            if f.is_none() {
                if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir)?;
                }
                *f = Some(std::fs::OpenOptions::new().create(true).append(true).open(&self.path)?);
            }
            let file = f.as_mut().expect("just opened");
            file.write_all(&line).and_then(|_| file.sync_data())
        };
        match &r {
            Ok(()) => {
                let n = self.metrics.broker.dead_lettered.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                static KEPT: RateLimited = RateLimited::every(1000);
                KEPT.warn(|| {
                    format!(
                        "a write no database accepted was kept in {} ({reason}); {n} so far",
                        self.path.display()
                    )
                });
            }
            Err(e) => tracing::error!(file = %self.path.display(), error = %e, "cannot write the dead-letter file"),
        }
        r
    }
}
