//! `${var}` templates compiled once at load time into bind parameters. Statement text is never
//! rendered with values: SQL/CQL placeholders become `$n` or `?`, Redis command tokens become
//! separate binary-safe arguments.

use crate::model::{Event, Hook, Value, Var};
use std::sync::Arc;

/// How a database spells positional parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamStyle {
    /// `$1, $2, …` (PostgreSQL)
    Numbered,
    /// `?` (MySQL, SQLite, CQL)
    Question,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TemplateError {
    #[error("unknown placeholder `${{{0}}}`{1}")]
    Unknown(String, String),
    #[error("placeholder `${{{0}}}` is not available on hook {1} (available: {2})")]
    NotOnHook(String, Hook, String),
    #[error("unterminated placeholder `${{` in `{0}`")]
    Unterminated(String),
    #[error("placeholder `${{message}}` is only meaningful in redis commands")]
    MessageOutsideRedis,
    #[error("empty statement")]
    Empty,
    #[error("placeholder `${{{0}}}` is inside {1}: write it bare (`${{{0}}}`), values are always bound as parameters")]
    Quoted(String, Quote),
    #[error("placeholder `${{{0}}}` is inside {1}, where the database never sees its parameter: move it out of the comment or delete it")]
    InComment(String, Comment),
    #[error("hand-written parameter `{0}`: write a `${{name}}` placeholder instead (e.g. `${{clientid}}`), bind parameters come only from placeholders")]
    HandWritten(String),
}

/// The quoting around a misplaced SQL placeholder, for its error message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Quote {
    /// `'…'`
    Single,
    /// `"…"`: an identifier in PostgreSQL, SQLite and CQL, a string in MySQL.
    Double,
    /// `` `…` `` (MySQL, SQLite)
    Backtick,
    /// `$tag$…$tag$` (PostgreSQL); holds the delimiter.
    Dollar(String),
}

impl std::fmt::Display for Quote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Quote::Single => f.write_str("a quoted string ('…')"),
            Quote::Double => f.write_str("double quotes (\"…\")"),
            Quote::Backtick => f.write_str("backticks (`…`)"),
            Quote::Dollar(d) => write!(f, "a dollar-quoted string ({d}…{d})"),
        }
    }
}

/// The kind of SQL comment holding a misplaced placeholder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comment {
    Line,
    Block,
}

impl std::fmt::Display for Comment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Comment::Line => "a `--` comment",
            Comment::Block => "a `/* */` comment",
        })
    }
}

/// A compiled SQL/CQL statement: final text plus the variables bound in order.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Statement {
    pub text: Arc<str>,
    pub params: Vec<Var>,
}

impl Statement {
    pub fn compile(src: &str, style: ParamStyle, hook: Hook) -> Result<Statement, TemplateError> {
        if src.trim().is_empty() {
            return Err(TemplateError::Empty);
        }
        let mut text = String::with_capacity(src.len());
        let mut params = Vec::new();
        for piece in split(src)? {
            match piece {
                Piece::Text(t) => text.push_str(t),
                Piece::Var(name) => {
                    let var = resolve(name, hook)?;
                    if var == Var::Message {
                        return Err(TemplateError::MessageOutsideRedis);
                    }
                    params.push(var);
                    match style {
                        ParamStyle::Numbered => text.push_str(&format!("${}", params.len())),
                        ParamStyle::Question => text.push('?'),
                    }
                }
            }
        }
        check_sql(src, style)?;
        Ok(Statement { text: text.into(), params })
    }

    pub fn bind(&self, event: &Event, node: &Arc<str>) -> Vec<Value> {
        self.params.iter().map(|v| event.value(*v, node)).collect()
    }
}

/// One token of a Redis command template.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Arg {
    Literal(Vec<u8>),
    /// The whole token is one placeholder.
    Var(Var),
    /// The key (token 2): placeholders substituted as substrings.
    Spliced(Vec<KeyPart>),
    /// `${message}`: the message's field list.
    MessageFields,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum KeyPart {
    Text(String),
    Var(Var),
}

/// A Redis command compiled from `"CMD key a b"` by EMQX's tokenizing rules (SPEC §2.1).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Command {
    pub args: Vec<Arg>,
}

impl Command {
    pub fn compile(src: &str, hook: Hook) -> Result<Command, TemplateError> {
        let mut args = Vec::new();
        for (i, tok) in src.split(' ').filter(|t| !t.is_empty()).enumerate() {
            let pieces = split(tok)?;
            let arg = match (i, pieces.as_slice()) {
                (_, [Piece::Text(t)]) => Arg::Literal(t.as_bytes().to_vec()),
                (0, _) => Arg::Literal(tok.as_bytes().to_vec()),
                (1, _) => Arg::Spliced(
                    pieces
                        .iter()
                        .map(|p| match p {
                            Piece::Text(t) => Ok(KeyPart::Text(t.to_string())),
                            Piece::Var(n) => resolve(n, hook).map(KeyPart::Var),
                        })
                        .collect::<Result<_, _>>()?,
                ),
                (_, [Piece::Var(n)]) => match resolve(n, hook)? {
                    Var::Message => Arg::MessageFields,
                    v => Arg::Var(v),
                },
                // EMQX substitutes non-key tokens only when the whole token is a placeholder.
                _ => Arg::Literal(tok.as_bytes().to_vec()),
            };
            args.push(arg);
        }
        if args.is_empty() {
            return Err(TemplateError::Empty);
        }
        Ok(Command { args })
    }

    /// The command's arguments for one event, each a separate binary-safe value.
    pub fn bind(&self, event: &Event, node: &Arc<str>) -> Vec<Vec<u8>> {
        let mut out = Vec::with_capacity(self.args.len());
        for a in &self.args {
            match a {
                Arg::Literal(b) => out.push(b.clone()),
                Arg::Var(v) => out.push(event.value(*v, node).to_bytes()),
                Arg::Spliced(parts) => {
                    let mut key = Vec::new();
                    for p in parts {
                        match p {
                            KeyPart::Text(t) => key.extend_from_slice(t.as_bytes()),
                            KeyPart::Var(v) => key.extend(event.value(*v, node).to_bytes()),
                        }
                    }
                    out.push(key);
                }
                Arg::MessageFields => {
                    for (name, var) in [
                        ("id", Var::Msgid),
                        ("from", Var::Clientid),
                        ("qos", Var::Qos),
                        ("topic", Var::Topic),
                        ("payload", Var::Payload),
                        ("ts", Var::Timestamp),
                        ("retain", Var::Retain),
                    ] {
                        out.push(name.as_bytes().to_vec());
                        out.push(event.value(var, node).to_bytes());
                    }
                }
            }
        }
        out
    }
}

enum Piece<'a> {
    Text(&'a str),
    Var(&'a str),
}

fn split(src: &str) -> Result<Vec<Piece<'_>>, TemplateError> {
    let mut out = Vec::new();
    let mut rest = src;
    while let Some(start) = rest.find("${") {
        if start > 0 {
            out.push(Piece::Text(&rest[..start]));
        }
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or_else(|| TemplateError::Unterminated(src.to_string()))?;
        out.push(Piece::Var(after[..end].trim()));
        rest = &after[end + 1..];
    }
    if !rest.is_empty() {
        out.push(Piece::Text(rest));
    }
    Ok(out)
}

/// Rejects statement text where a placeholder would not become a bind parameter (inside quotes or
/// a comment, where it reaches the database as the literal text `$1`/`?`), and parameters written
/// by hand, which would shift the numbering of the bound values.
fn check_sql(src: &str, style: ParamStyle) -> Result<(), TemplateError> {
    let plain = scan_sql(src, style, false);
    // MySQL reads `\` inside quotes as an escape, SQLite and CQL do not, and they share one style:
    // report only what is a trap under both readings, never refuse a statement that is fine.
    if style == ParamStyle::Question && plain.is_err() && src.contains('\\') && scan_sql(src, style, true).is_ok() {
        return Ok(());
    }
    plain
}

#[derive(Clone, Copy)]
enum Lex<'a> {
    Code,
    /// Inside `'…'`, `"…"` or `` `…` ``, closed by `close` (doubled, it is an escaped quote).
    Quoted {
        close: u8,
        backslash: bool,
    },
    /// Inside a PostgreSQL dollar quote; holds the delimiter (`$$`, `$tag$`).
    Dollar(&'a str),
    LineComment,
    /// Nesting depth: PostgreSQL nests `/* */`, MySQL and SQLite do not.
    BlockComment(u32),
}

/// A lexer for just enough SQL to know what is code: quotes, comments, PostgreSQL dollar quotes.
/// `${…}` is recognized everywhere exactly as `split` does.
fn scan_sql(src: &str, style: ParamStyle, backslash_escapes: bool) -> Result<(), TemplateError> {
    let pg = style == ParamStyle::Numbered;
    let b = src.as_bytes();
    let mut state = Lex::Code;
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"${") {
            let len = src[i + 2..].find('}').ok_or_else(|| TemplateError::Unterminated(src.to_string()))?;
            let name = src[i + 2..i + 2 + len].trim().to_string();
            match state {
                Lex::Code => {}
                Lex::Quoted { close, .. } => {
                    let q = match close {
                        b'\'' => Quote::Single,
                        b'"' => Quote::Double,
                        _ => Quote::Backtick,
                    };
                    return Err(TemplateError::Quoted(name, q));
                }
                Lex::Dollar(d) => return Err(TemplateError::Quoted(name, Quote::Dollar(d.to_string()))),
                Lex::LineComment => return Err(TemplateError::InComment(name, Comment::Line)),
                Lex::BlockComment(_) => return Err(TemplateError::InComment(name, Comment::Block)),
            }
            i += len + 3;
            continue;
        }
        let c = b[i];
        let next = b.get(i + 1).copied();
        match state {
            Lex::Code => match c {
                b'\'' => {
                    // PostgreSQL E'…' strings take backslash escapes (`E'\''` is one quote).
                    let e_string = pg && i > 0 && matches!(b[i - 1], b'E' | b'e') && !(i > 1 && is_word(b[i - 2]));
                    state = Lex::Quoted {
                        close: c,
                        backslash: backslash_escapes || e_string,
                    };
                }
                b'"' => {
                    state = Lex::Quoted {
                        close: c,
                        backslash: backslash_escapes,
                    }
                }
                b'`' if !pg => {
                    state = Lex::Quoted {
                        close: c,
                        backslash: false,
                    }
                }
                b'-' if next == Some(b'-') => {
                    state = Lex::LineComment;
                    i += 1;
                }
                b'/' if next == Some(b'*') => {
                    state = Lex::BlockComment(1);
                    i += 1;
                }
                // `?` is a jsonb operator in PostgreSQL, a parameter elsewhere.
                b'?' if !pg => return Err(TemplateError::HandWritten(param_text(src, i))),
                // In PostgreSQL `$` inside a word is part of an identifier (`a$1`).
                b'$' if pg && !(i > 0 && is_word(b[i - 1])) => {
                    if next.is_some_and(|n| n.is_ascii_digit()) {
                        return Err(TemplateError::HandWritten(param_text(src, i)));
                    }
                    if let Some(d) = dollar_delimiter(&src[i..]) {
                        state = Lex::Dollar(d);
                        i += d.len();
                        continue;
                    }
                }
                _ => {}
            },
            Lex::Quoted { close, backslash } => {
                if backslash && c == b'\\' {
                    // Skip the escaped byte, unless it starts a placeholder: `split` sees one there.
                    if !b[i + 1..].starts_with(b"${") {
                        i += 1;
                    }
                } else if c == close {
                    if next == Some(close) {
                        i += 1;
                    } else {
                        state = Lex::Code;
                    }
                }
            }
            Lex::Dollar(d) => {
                if b[i..].starts_with(d.as_bytes()) {
                    state = Lex::Code;
                    i += d.len();
                    continue;
                }
            }
            Lex::LineComment => {
                if c == b'\n' {
                    state = Lex::Code;
                }
            }
            Lex::BlockComment(depth) => {
                if c == b'*' && next == Some(b'/') {
                    state = if depth == 1 { Lex::Code } else { Lex::BlockComment(depth - 1) };
                    i += 1;
                } else if pg && c == b'/' && next == Some(b'*') {
                    state = Lex::BlockComment(depth + 1);
                    i += 1;
                }
            }
        }
        i += 1;
    }
    Ok(())
}

/// An identifier byte in PostgreSQL's sense (non-ASCII bytes are letters there).
fn is_word(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80
}

/// `$$` or `$tag$` at the start of `s` (which starts with `$`); a tag does not start with a digit.
fn dollar_delimiter(s: &str) -> Option<&str> {
    let tag = &s.as_bytes()[1..];
    let end = tag.iter().position(|&c| c == b'$')?;
    let valid = tag[..end].iter().all(|&c| is_word(c)) && !tag.first().is_some_and(u8::is_ascii_digit);
    valid.then(|| &s[..end + 2])
}

/// The hand-written parameter at `i` (`?`, `?3`, `$1`) for the error message.
fn param_text(src: &str, i: usize) -> String {
    let digits = src[i + 1..].bytes().take_while(u8::is_ascii_digit).count();
    src[i..i + 1 + digits].to_string()
}

fn resolve(name: &str, hook: Hook) -> Result<Var, TemplateError> {
    let Some(var) = Var::parse(name) else {
        let names = hook.vars().iter().map(|v| v.name());
        return Err(TemplateError::Unknown(name.to_string(), crate::config::did_you_mean(name, names)));
    };
    if !hook.vars().contains(&var) {
        let avail = hook.vars().iter().map(|v| v.name()).collect::<Vec<_>>().join(", ");
        return Err(TemplateError::NotOnHook(name.to_string(), hook, avail));
    }
    Ok(var)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sql_placeholders_become_parameters() {
        let s = Statement::compile(
            "insert into t(c, p) values (${clientid}, ${payload})",
            ParamStyle::Numbered,
            Hook::MessagePublish,
        )
        .unwrap();
        assert_eq!(&*s.text, "insert into t(c, p) values ($1, $2)");
        assert_eq!(s.params, vec![Var::Clientid, Var::Payload]);
        let q = Statement::compile(
            "delete from a where c = ${clientid} and t = ${topic}",
            ParamStyle::Question,
            Hook::SessionUnsubscribed,
        )
        .unwrap();
        assert_eq!(&*q.text, "delete from a where c = ? and t = ?");
    }

    #[test]
    fn unknown_and_unavailable_placeholders_are_rejected() {
        let e = Statement::compile("x ${clientd}", ParamStyle::Question, Hook::MessagePublish).unwrap_err();
        assert!(e.to_string().contains("did you mean `clientid`"), "{e}");
        assert!(matches!(
            Statement::compile("x ${payload}", ParamStyle::Question, Hook::ClientConnected),
            Err(TemplateError::NotOnHook(..))
        ));
        assert!(matches!(
            Statement::compile("x ${clientid", ParamStyle::Question, Hook::ClientConnected),
            Err(TemplateError::Unterminated(..))
        ));
    }

    fn pg(src: &str) -> Result<Statement, TemplateError> {
        Statement::compile(src, ParamStyle::Numbered, Hook::MessagePublish)
    }

    fn q(src: &str) -> Result<Statement, TemplateError> {
        Statement::compile(src, ParamStyle::Question, Hook::MessagePublish)
    }

    fn quoted(name: &str, q: Quote) -> Result<Statement, TemplateError> {
        Err(TemplateError::Quoted(name.into(), q))
    }

    #[test]
    fn quoted_placeholders_are_rejected() {
        for compile in [pg, q] {
            assert_eq!(compile("insert into t values ('${clientid}')"), quoted("clientid", Quote::Single));
            assert_eq!(compile("insert into t values ('a/${topic}/b')"), quoted("topic", Quote::Single));
            assert_eq!(compile("select \"${clientid}\" from t"), quoted("clientid", Quote::Double));
            assert_eq!(
                compile("insert into t values ('it''s ${ clientid }')"),
                quoted("clientid", Quote::Single)
            );
        }
        assert_eq!(q("select `${clientid}` from t"), quoted("clientid", Quote::Backtick));
        assert_eq!(pg("select $$ ${payload} $$"), quoted("payload", Quote::Dollar("$$".into())));
        assert_eq!(pg("select $fn$ a ${payload} $fn$"), quoted("payload", Quote::Dollar("$fn$".into())));
        assert_eq!(pg("select E'\\' ${payload}'"), quoted("payload", Quote::Single));
        let e = q("insert into t values ('${clientid}')").unwrap_err().to_string();
        assert_eq!(
            e,
            "placeholder `${clientid}` is inside a quoted string ('…'): write it bare (`${clientid}`), values are always bound as parameters"
        );
    }

    #[test]
    fn placeholders_in_comments_are_rejected() {
        for compile in [pg, q] {
            assert_eq!(
                compile("insert into t values (${clientid}) -- was ${topic}\n"),
                Err(TemplateError::InComment("topic".into(), Comment::Line))
            );
            assert_eq!(
                compile("insert into t /* ${topic} */ values (${clientid})"),
                Err(TemplateError::InComment("topic".into(), Comment::Block))
            );
        }
        // PostgreSQL nests block comments: the first `*/` does not end this one.
        assert_eq!(
            pg("select 1 /* a /* b */ ${topic} */"),
            Err(TemplateError::InComment("topic".into(), Comment::Block))
        );
        let e = pg("select 1 -- ${topic}").unwrap_err().to_string();
        assert!(e.contains("inside a `--` comment"), "{e}");
    }

    #[test]
    fn hand_written_parameters_are_rejected() {
        assert_eq!(
            pg("insert into t values ($1, ${clientid})"),
            Err(TemplateError::HandWritten("$1".into()))
        );
        assert_eq!(
            pg("insert into t values (${clientid}, $12)"),
            Err(TemplateError::HandWritten("$12".into()))
        );
        assert_eq!(
            q("insert into t values (?, ${clientid})"),
            Err(TemplateError::HandWritten("?".into()))
        );
        assert_eq!(q("insert into t values (?2)"), Err(TemplateError::HandWritten("?2".into())));
        let e = q("delete from t where c = ?").unwrap_err().to_string();
        assert_eq!(
            e,
            "hand-written parameter `?`: write a `${name}` placeholder instead (e.g. `${clientid}`), bind parameters come only from placeholders"
        );
    }

    #[test]
    fn legitimate_statements_still_compile() {
        let s = pg("insert into t(a) values (${clientid}) on conflict do nothing").unwrap();
        assert_eq!(&*s.text, "insert into t(a) values ($1) on conflict do nothing");
        // `?` is jsonb's key-exists operator in PostgreSQL.
        let s = pg("select * from t where doc ? 'key' and c = ${clientid}").unwrap();
        assert_eq!(&*s.text, "select * from t where doc ? 'key' and c = $1");
        assert!(pg("select 1 where doc ?| array['a'] and q = ${qos}::int").is_ok());
        let s = pg("insert into t values (${qos}::int, ${payload}::bytea)").unwrap();
        assert_eq!(&*s.text, "insert into t values ($1::int, $2::bytea)");
        for compile in [pg, q] {
            assert!(compile("insert into t values ('it''s', ${clientid})").is_ok());
            assert!(compile("insert into t values ('$1 ?', \"a\"\"b\", ${clientid})").is_ok());
            assert!(compile("-- keep the newest\ninsert into t values (${clientid})").is_ok());
            assert!(compile("insert into t /* no placeholders here */ values (${clientid}) -- done").is_ok());
            assert!(compile("insert into t values (${clientid}, 'a-- b', 'c/* d')").is_ok());
        }
        assert!(pg("insert into t values (E'\\'', ${clientid})").is_ok());
        assert!(pg("insert into t values (E'a\\\\', ${clientid})").is_ok());
        assert!(pg("do $$ begin perform 1; end $$; select ${clientid}").is_ok());
        assert!(pg("select $body$ it's $1 ? $body$, ${clientid}").is_ok());
        // `$` inside a word is an identifier character, not a parameter or dollar quote.
        assert!(pg("select a$1, b$x$ from t where c = ${clientid}").is_ok());
        assert!(q("insert into `t` (`a`) values (${clientid})").is_ok());
        // Fine in MySQL, where `\'` is an escaped quote (a trap only under SQLite's reading): accepted.
        assert!(q("insert into t values ('it\\'s', ${clientid})").is_ok());
        assert!(q("insert into t values ('C:\\', ${clientid})").is_ok());
        // `$` means nothing special outside PostgreSQL.
        assert!(q("insert into t values ('a', ${clientid}) -- $1").is_ok());
    }

    #[test]
    fn redis_commands_are_not_scanned_as_sql() {
        assert!(Command::compile("SET 'k:${clientid}' ?", Hook::MessagePublish).is_ok());
    }

    #[test]
    fn redis_tokens_follow_emqx_rules() {
        let c = Command::compile(
            "HMSET mqtt:client:${clientid} state 1 node ${node} x${clientid}",
            Hook::ClientConnected,
        )
        .unwrap();
        assert_eq!(c.args[0], Arg::Literal(b"HMSET".to_vec()));
        assert_eq!(
            c.args[1],
            Arg::Spliced(vec![KeyPart::Text("mqtt:client:".into()), KeyPart::Var(Var::Clientid)])
        );
        assert_eq!(c.args[5], Arg::Var(Var::Node));
        assert_eq!(c.args[6], Arg::Literal(b"x${clientid}".to_vec()));
    }
}
