//! Authorization of subscriptions, publishes and deliveries. An [`Authorizer`] answers, once per
//! connection, with a [`ClientAcl`] the connection then asks synchronously for every SUBSCRIBE,
//! PUBLISH and delivered message: a database-backed authorizer loads a client's rules at
//! connect (as EMQX 4's ACL cache did) and plugs in the same way as the file below.
//!
//! The file is Mosquitto's `acl_file` format:
//!
//! ```text
//! # lines before any `user` apply to everyone, anonymous clients included
//! topic [read|write|readwrite|deny] <filter>
//! user <name>
//! topic ...                  # this user's rules
//! pattern [read|write|readwrite|deny] <filter with %c / %u>   # everyone, always
//! ```
//!
//! A client may do what a matching rule grants and no matching `deny` forbids; with no
//! matching rule it may not.

use crate::model::Client;
use crate::topic;
use std::path::Path;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Subscribe to a filter, or receive a message on a topic.
    Read,
    /// Publish to a topic.
    Write,
}

/// What one client may do; asked on the connection's hot path, so it never waits.
pub trait ClientAcl: Send + Sync {
    /// `filter` for [`Access::Read`] on SUBSCRIBE; a topic for deliveries and publishes.
    fn allows(&self, access: Access, topic_or_filter: &str, is_filter: bool) -> bool;
}

/// A source of per-client ACLs.
pub trait Authorizer: Send + Sync {
    fn for_client(&self, client: &Client) -> Arc<dyn ClientAcl>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grant {
    Read,
    Write,
    ReadWrite,
    Deny,
}

#[derive(Debug, Clone)]
struct Line {
    grant: Grant,
    filter: String,
}

/// A parsed ACL file.
#[derive(Debug, Default)]
pub struct AclFile {
    everyone: Vec<Line>,
    users: std::collections::HashMap<String, Vec<Line>>,
    patterns: Vec<Line>,
}

impl AclFile {
    /// Reads `path`; an error names `file:line`.
    pub fn load(path: &Path) -> Result<AclFile, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: cannot read the ACL file: {e}", path.display()))?;
        Self::parse(&text).map_err(|(line, e)| format!("{}:{line}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<AclFile, (usize, String)> {
        let mut acl = AclFile::default();
        let mut user: Option<String> = None;
        for (i, raw) in text.lines().enumerate() {
            let n = i + 1;
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (word, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
            let rest = rest.trim();
            match word {
                "user" => {
                    if rest.is_empty() {
                        return Err((n, "`user` needs a user name".into()));
                    }
                    user = Some(rest.to_string());
                }
                "topic" | "pattern" => {
                    let (grant, filter) = match rest.split_once(char::is_whitespace) {
                        Some((g @ ("read" | "write" | "readwrite" | "deny"), f)) => (g, f.trim()),
                        _ => ("readwrite", rest),
                    };
                    let grant = match grant {
                        "read" => Grant::Read,
                        "write" => Grant::Write,
                        "deny" => Grant::Deny,
                        _ => Grant::ReadWrite,
                    };
                    if filter.is_empty() {
                        return Err((n, format!("`{word}` needs a topic filter")));
                    }
                    let probe = filter.replace("%c", "c").replace("%u", "u");
                    if !topic::valid_filter(&probe) {
                        return Err((n, format!("invalid topic filter {filter:?}")));
                    }
                    let l = Line {
                        grant,
                        filter: filter.to_string(),
                    };
                    match (word, &user) {
                        ("pattern", _) => acl.patterns.push(l),
                        (_, Some(u)) => acl.users.entry(u.clone()).or_default().push(l),
                        (_, None) => acl.everyone.push(l),
                    }
                }
                other => {
                    return Err((
                        n,
                        format!(
                            "unknown ACL line `{other}`{}",
                            crate::config::did_you_mean(other, ["topic", "user", "pattern"])
                        ),
                    ))
                }
            }
        }
        Ok(acl)
    }
}

impl Authorizer for AclFile {
    fn for_client(&self, client: &Client) -> Arc<dyn ClientAcl> {
        let mut lines: Vec<Line> = self.everyone.clone();
        if let Some(u) = client.username.as_deref() {
            lines.extend(self.users.get(u).cloned().unwrap_or_default());
        }
        // %c / %u: a pattern is only for clients that have the value, and a value holding a
        // wildcard or separator never widens a pattern (it cannot match a topic level then).
        for p in &self.patterns {
            let mut f = p.filter.clone();
            if f.contains("%u") {
                match client.username.as_deref() {
                    Some(u) if !u.contains(['+', '#', '/']) => f = f.replace("%u", u),
                    _ => continue,
                }
            }
            if f.contains("%c") {
                if client.clientid.contains(['+', '#', '/']) {
                    continue;
                }
                f = f.replace("%c", &client.clientid);
            }
            lines.push(Line { grant: p.grant, filter: f });
        }
        Arc::new(Rules(lines))
    }
}

struct Rules(Vec<Line>);

impl ClientAcl for Rules {
    fn allows(&self, access: Access, t: &str, is_filter: bool) -> bool {
        let hit = |l: &Line| {
            if is_filter {
                covers(&l.filter, t)
            } else {
                topic::matches(t, &l.filter)
            }
        };
        // A deny refuses what it covers (Mosquitto's rule: a wildcard subscription reaching a
        // denied topic is granted, and the denied messages are held back at delivery).
        let denied = self.0.iter().filter(|l| l.grant == Grant::Deny).any(hit);
        if denied {
            return false;
        }
        self.0.iter().any(|l| {
            let grants = matches!(
                (l.grant, access),
                (Grant::ReadWrite, _) | (Grant::Read, Access::Read) | (Grant::Write, Access::Write)
            );
            grants && hit(l)
        })
    }
}

/// Every topic that `filter` matches is matched by `rule` too.
fn covers(rule: &str, filter: &str) -> bool {
    if filter.starts_with('$') != rule.starts_with('$') && !rule.starts_with('$') && (rule.starts_with('+') || rule.starts_with('#')) {
        // Leading wildcards of a rule never reach `$` topics.
        return false;
    }
    let mut r = rule.split('/');
    let mut f = filter.split('/');
    loop {
        match (r.next(), f.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(fl)) if fl != "#" => {}
            (Some(rl), Some(fl)) if rl == fl && rl != "+" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(id: &str, user: Option<&str>) -> Client {
        Client {
            clientid: id.into(),
            username: user.map(Into::into),
            peerhost: "127.0.0.1".into(),
            peerport: 1,
            proto_ver: 4,
            keepalive: 30,
            clean_start: true,
            persistent: false,
            connected_at: 0,
        }
    }

    #[test]
    fn the_paho_acl_refuses_only_the_denied_topic() {
        let acl = AclFile::parse("topic deny test/nosubscribe\ntopic readwrite #\ntopic readwrite $SYS/#\n").unwrap();
        let c = acl.for_client(&client("a", None));
        assert!(!c.allows(Access::Read, "test/nosubscribe", true));
        assert!(c.allows(Access::Read, "TopicA/#", true));
        assert!(c.allows(Access::Read, "$SYS/#", true));
        assert!(c.allows(Access::Write, "TopicA/B", false));
        assert!(c.allows(Access::Read, "test/#", true), "granted; deliveries are checked");
        assert!(!c.allows(Access::Read, "test/nosubscribe", false));
    }

    #[test]
    fn users_and_patterns() {
        let text = "topic read public/#\nuser alice\ntopic write alice/in\npattern readwrite dev/%c/#\npattern read home/%u/+\n";
        let acl = AclFile::parse(text).unwrap();
        let alice = acl.for_client(&client("d1", Some("alice")));
        let anon = acl.for_client(&client("d2", None));
        assert!(alice.allows(Access::Write, "alice/in", false));
        assert!(!anon.allows(Access::Write, "alice/in", false));
        assert!(anon.allows(Access::Read, "public/x", false));
        assert!(!anon.allows(Access::Write, "public/x", false), "read only");
        assert!(anon.allows(Access::Write, "dev/d2/t", false));
        assert!(!anon.allows(Access::Write, "dev/d1/t", false));
        assert!(alice.allows(Access::Read, "home/alice/+", true));
        assert!(!anon.allows(Access::Read, "home/u/+", true), "no user name, no %u rule");
        let hostile = acl.for_client(&client("#", None));
        assert!(!hostile.allows(Access::Read, "dev/#", true), "a client id never widens a pattern");
    }

    #[test]
    fn bad_lines_name_their_line() {
        assert_eq!(AclFile::parse("topic read a\nbogus x\n").unwrap_err().0, 2);
        assert!(AclFile::parse("topic read a/#/b\n").is_err());
        assert!(AclFile::parse("user\n").is_err());
    }

    #[test]
    fn covering_and_overlapping() {
        assert!(covers("#", "a/b"));
        assert!(covers("a/+", "a/b"));
        assert!(!covers("a/+", "a/#"));
        assert!(!covers("a/b", "a/+"));
        assert!(!covers("#", "$SYS/x"));
        assert!(covers("$SYS/#", "$SYS/x"));
    }
}
