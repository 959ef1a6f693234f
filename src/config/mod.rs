//! Configuration: the line grammar (`grammar`) and the typed, validated model (`model`).

mod grammar;
mod model;

pub use grammar::{did_you_mean, suggest, ConfError, Entries, Entry, Origin};
pub use model::*;
