//! `${var}` templates compiled once at load time into bind parameters (each backend compiles
//! its rules' own statements with them).

mod template;

pub use template::{Arg, Command, KeyPart, ParamStyle, Statement, TemplateError};
