//! smelt-engine: running sequences on a model — sampling, stop conditions, generation.

pub mod generate;
mod rng;
pub mod sampling;

pub use generate::{FinishReason, GenerateError, GenerateParams, Generation, Session, Step};
pub use sampling::{Sampler, SamplingParams};
