//! The template language lives in `herald_shared::template`: the dispatcher checks templates
//! when it loads the observers file, this worker renders them.

pub use herald_shared::template::render;
