//! One module per kind of document: how a message of that stream becomes a document, and the
//! mapping of its own fields. Adding a kind is a module here and a variant of `document::Kind`.

pub mod dead_letter;
pub mod event;
pub mod job;
pub mod outcome;
