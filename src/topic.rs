//! MQTT topic names and filters: validation and matching, shared by the broker, the rule
//! dispatcher and every backend so that all of them agree on what "matches" means.

/// True when `topic` (a concrete topic name) matches `filter` (which may hold `+` and `#`).
///
/// Topics starting with `$` never match a filter whose first level is a wildcard (MQTT 4.7.2).
pub fn matches(topic: &str, filter: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut t = topic.split('/');
    let mut f = filter.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(tl)) if fl == tl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// A valid topic name for PUBLISH: non-empty, no wildcards, no NUL.
pub fn valid_topic(topic: &str) -> bool {
    !topic.is_empty() && !topic.contains(['+', '#', '\0'])
}

/// A valid subscription filter: `#` only as the last level, `+` only as a whole level.
pub fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    let last = levels.len() - 1;
    levels.iter().enumerate().all(|(i, l)| match *l {
        "#" => i == last,
        "+" => true,
        other => !other.contains(['+', '#']),
    })
}

pub fn has_wildcards(filter: &str) -> bool {
    filter.contains(['+', '#'])
}

/// The literal part of a filter before its first wildcard level, e.g. `a/b/` for `a/b/+/c`.
/// Backends use it to narrow an index range scan before exact matching.
pub fn literal_prefix(filter: &str) -> &str {
    match filter.find(['+', '#']) {
        Some(i) => &filter[..i],
        None => filter,
    }
}

/// The topic one level above a trailing `#` that directly follows the literal prefix: `x` for
/// `x/#`. `#` also matches its parent level (MQTT 4.7.1.2), and that topic lies outside the
/// prefix `x/`, so scans by prefix must look it up as well.
pub fn parent_level(filter: &str) -> Option<&str> {
    let stem = filter.strip_suffix("/#")?;
    (!stem.is_empty() && !has_wildcards(stem)).then_some(stem)
}

/// A half-open byte range `[lo, hi)` containing every topic a filter can match, for index range
/// scans; `None` when the filter starts with a wildcard (no narrowing possible). For `x/#` it
/// starts at `x` itself (the parent level); callers still match each topic exactly.
pub fn prefix_range(filter: &str) -> Option<(String, String)> {
    let prefix = literal_prefix(filter);
    if !has_wildcards(filter) {
        return Some((filter.to_string(), format!("{filter}\0")));
    }
    // A literal prefix before a wildcard level ends with '/', whose successor byte is '0'.
    let stem = prefix.strip_suffix('/')?;
    let lo = match parent_level(filter) {
        Some(parent) => parent.to_string(),
        None => prefix.to_string(),
    };
    Some((lo, format!("{stem}0")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matching_follows_mqtt_rules() {
        assert!(matches("a/b/c", "a/+/c"));
        assert!(matches("a/b/c", "a/#"));
        assert!(matches("a", "a/#"));
        assert!(matches("a/b", "#"));
        assert!(!matches("a/b/c", "a/+"));
        assert!(!matches("$SYS/x", "#"));
        assert!(!matches("$SYS/x", "+/x"));
        assert!(matches("$SYS/x", "$SYS/#"));
        assert!(matches("/a", "+/a"));
        assert!(!matches("a/b", "a/b/c"));
    }

    #[test]
    fn validation() {
        assert!(valid_filter("a/+/#"));
        assert!(!valid_filter("a/#/b"));
        assert!(!valid_filter("a/b+"));
        assert!(valid_topic("a/b"));
        assert!(!valid_topic("a/+"));
        assert_eq!(literal_prefix("a/b/+/c"), "a/b/");
        assert_eq!(literal_prefix("a/b"), "a/b");
    }

    #[test]
    fn a_trailing_hash_range_includes_the_parent_level() {
        assert_eq!(parent_level("x/#"), Some("x"));
        assert_eq!(parent_level("a/b/#"), Some("a/b"));
        assert_eq!(parent_level("a/+/#"), None);
        assert_eq!(parent_level("#"), None);
        let (lo, hi) = prefix_range("x/#").unwrap();
        for t in ["x", "x/y", "x/y/z"] {
            assert!(lo.as_str() <= t && t < hi.as_str(), "{t} in [{lo}, {hi})");
        }
        let (lo, hi) = prefix_range("a/+/c").unwrap();
        assert!(lo.as_str() <= "a/b/c" && "a/b/c" < hi.as_str());
    }
}
