//! The sysctl-like line grammar shared by `etc/mqtt-persist.conf` and `etc/plugins/*.conf`:
//! `key = value` per line, `#` comments, later duplicates win. Environment variables
//! `MQTT_PERSIST__A__B=v` override `a.b`. Every entry remembers where it came from so that all
//! later errors can name file and line.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

/// Where a conf value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    File { path: Arc<str>, line: usize },
    Env(String),
    Default,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File { path, line } => write!(f, "{path}:{line}"),
            Origin::Env(name) => write!(f, "env {name}"),
            Origin::Default => f.write_str("<default>"),
        }
    }
}

/// A conf error, always with its origin.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{origin}: {message}")]
pub struct ConfError {
    pub origin: Origin,
    pub message: String,
}

impl ConfError {
    pub fn new(origin: &Origin, message: impl Into<String>) -> Self {
        ConfError {
            origin: origin.clone(),
            message: message.into(),
        }
    }
}

/// One `key = value` line.
#[derive(Debug, Clone)]
pub struct Entry {
    pub key: String,
    pub value: String,
    pub origin: Origin,
}

/// Entries keyed by name; the last definition wins.
#[derive(Debug, Default, Clone)]
pub struct Entries {
    pub map: BTreeMap<String, Entry>,
    pub warnings: Vec<String>,
}

pub const ENV_PREFIX: &str = "MQTT_PERSIST__";

impl Entries {
    /// Parse one file; syntax errors are collected, not fatal, so `check` can show them all.
    pub fn parse_file(&mut self, path: &Path, errors: &mut Vec<ConfError>) -> std::io::Result<()> {
        let text = std::fs::read_to_string(path)?;
        let name: Arc<str> = Arc::from(path.display().to_string());
        self.parse_str(&name, &text, errors);
        Ok(())
    }

    pub fn parse_str(&mut self, name: &Arc<str>, text: &str, errors: &mut Vec<ConfError>) {
        for (i, raw) in text.lines().enumerate() {
            let origin = Origin::File {
                path: name.clone(),
                line: i + 1,
            };
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                errors.push(ConfError::new(&origin, format!("expected `key = value`, found `{line}`")));
                continue;
            };
            let key = key.trim();
            if key.is_empty() || key.split('.').any(|t| t.is_empty() || t.contains(char::is_whitespace)) {
                errors.push(ConfError::new(
                    &origin,
                    format!("malformed key `{key}`: expected dot-separated tokens"),
                ));
                continue;
            }
            self.insert(key.to_string(), value.trim().to_string(), origin);
        }
    }

    fn insert(&mut self, key: String, value: String, origin: Origin) {
        if let Some(prev) = self.map.get(&key) {
            if matches!(prev.origin, Origin::File { .. }) && matches!(origin, Origin::File { .. }) {
                self.warnings
                    .push(format!("{origin}: `{key}` is also set at {}; the later value wins", prev.origin));
            }
        }
        self.map.insert(key.clone(), Entry { key, value, origin });
    }

    /// Apply `MQTT_PERSIST__…` overrides whose key satisfies `accept`.
    pub fn apply_env(&mut self, vars: &[(String, String)], accept: impl Fn(&str) -> bool) {
        for (name, value) in vars {
            let Some(rest) = name.strip_prefix(ENV_PREFIX) else { continue };
            let key = rest.split("__").map(|s| s.to_ascii_lowercase()).collect::<Vec<_>>().join(".");
            if accept(&key) {
                self.insert(key, value.clone(), Origin::Env(name.clone()));
            }
        }
    }

    pub fn get(&self, key: &str) -> Option<&Entry> {
        self.map.get(key)
    }
}

/// The closest candidate by edit distance, for "did you mean" hints.
pub fn suggest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (levenshtein(word, c), c))
        .filter(|(d, c)| *d <= 3.max(c.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

pub fn did_you_mean<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> String {
    match suggest(word, candidates) {
        Some(s) => format!(" (did you mean `{s}`?)"),
        None => String::new(),
    }
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur.push((prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lines_comments_and_duplicates() {
        let mut e = Entries::default();
        let mut errs = vec![];
        e.parse_str(&Arc::from("t.conf"), "# c\n\na.b = 1\n a.b=2 \nbad line\nx..y = 3\n", &mut errs);
        assert_eq!(e.get("a.b").unwrap().value, "2");
        assert_eq!(e.warnings.len(), 1);
        assert_eq!(errs.len(), 2);
        assert_eq!(errs[0].to_string(), "t.conf:5: expected `key = value`, found `bad line`");
    }

    #[test]
    fn env_overrides_map_double_underscores_to_dots() {
        let mut e = Entries::default();
        let vars = vec![("MQTT_PERSIST__BACKEND__PGSQL__POOL1__POOL_SIZE".to_string(), "9".to_string())];
        e.apply_env(&vars, |_| true);
        assert_eq!(e.get("backend.pgsql.pool1.pool_size").unwrap().value, "9");
    }

    #[test]
    fn suggestions() {
        assert_eq!(
            suggest("on_mesage_fetch", ["on_message_fetch", "on_retain_lookup"]),
            Some("on_message_fetch")
        );
        assert_eq!(suggest("zzz", ["on_message_fetch"]), None);
    }
}
