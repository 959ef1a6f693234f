//! What rules do: builtin functions and compiled statement templates.

mod builtin;
mod template;

pub use builtin::Builtin;
pub use template::{Arg, Command, KeyPart, ParamStyle, Statement, TemplateError};
