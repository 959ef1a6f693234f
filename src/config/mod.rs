//! Configuration: the line grammar (`grammar`) and the typed, validated model (`model`).

mod builtin;
mod grammar;
mod model;

pub use builtin::Builtin;
pub use grammar::{did_you_mean, suggest, ConfError, Entries, Entry, Origin};
pub use model::*;
