//! `${var}` templates compiled once at load time into bind parameters. Statement text is never
//! rendered with values: SQL/CQL placeholders become `$n` or `?`, Redis command tokens become
//! separate binary-safe arguments.

use crate::hooks::{Event, Hook, Value, Var};
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
