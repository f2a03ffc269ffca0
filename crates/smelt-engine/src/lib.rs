//! smelt-engine: running sequences on a model — sampling, stop conditions, generation.

pub mod blocks;
pub mod disk_cache;
pub mod grammar;
pub mod generate;
mod rng;
pub mod sampling;
pub mod scheduler;

pub use generate::{FinishReason, GenerateError, GenerateParams, Generation, Session, Step};
pub use sampling::{Sampler, SamplingParams};
