//! One sequence's generation loop: prefill the prompt, then sample token by token until an
//! end-of-generation token, a stop string, the token limit or the end of the context.

use crate::grammar::{sample_constrained, AutomatonCache, Compiled, Constraint, TokenTrie};
use crate::sampling::{log_sum_exp, top_logprobs, Sampler, SamplingParams};
use smelt_kernels::pool::ThreadPool;
use smelt_model::arch::{BatchToken, Model, ModelError, Workspace};
use smelt_model::kv::KvCache;
use smelt_model::tokenizer::StreamDecoder;
use std::sync::Arc;

/// Tokens fed to the model per forward pass during prefill.
pub const PREFILL_CHUNK: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("the prompt has {prompt} tokens but the context holds {n_ctx}; shorten the prompt or raise the context size")]
    PromptTooLong { prompt: usize, n_ctx: usize },
    #[error("invalid parameter: {0}")]
    Param(String),
    #[error(transparent)]
    Model(#[from] ModelError),
}

#[derive(Clone, Debug)]
pub struct GenerateParams {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Stop before any of these strings (they are not included in the output).
    pub stop: Vec<String>,
    /// Keep going past end-of-generation tokens.
    pub ignore_eos: bool,
    /// How many alternatives to report per step (0 = none).
    pub top_logprobs: usize,
    /// Constrain the output to this grammar (generation ends when it is complete).
    pub grammar: Option<Compiled>,
}

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams { max_tokens: 256, sampling: SamplingParams::default(), stop: Vec::new(), ignore_eos: false, top_logprobs: 0, grammar: None }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// The token limit or the end of the context.
    Length,
    /// The caller asked to stop (e.g. Ctrl-C, client gone).
    Cancelled,
}

/// One generated token.
#[derive(Clone, Debug)]
pub struct Step {
    pub id: u32,
    /// Log-probability of `id` under the model (before sampling filters).
    pub logprob: f32,
    /// The most likely tokens and their log-probabilities, most likely first.
    pub top: Vec<(u32, f32)>,
    /// New text this step makes final (may be empty while a character or a possible stop
    /// string is incomplete).
    pub text: String,
}

#[derive(Clone, Debug)]
pub struct Generation {
    pub prompt_tokens: usize,
    pub steps: Vec<Step>,
    pub text: String,
    pub finish: FinishReason,
    /// Time spent on the grammar (checks, masks, advancing), when constrained.
    pub grammar_secs: f64,
    /// Full vocabulary masks the grammar computed.
    pub grammar_masks: usize,
}

/// A sequence with its KV cache, reusable across turns (a chat keeps its cache between turns).
pub struct Session {
    model: Arc<Model>,
    ws: Workspace,
    caches: Vec<KvCache>,
    /// Tokens whose keys and values are in the cache.
    tokens: Vec<u32>,
    n_ctx: usize,
    /// The vocabulary's trie, built on the first constrained generation.
    trie: Option<Arc<TokenTrie>>,
    /// Grammar automata, kept between generations that use the same grammar.
    automata: AutomatonCache,
}

impl Session {
    pub fn new(model: Arc<Model>, pool: Arc<ThreadPool>, n_ctx: usize) -> Session {
        let n_ctx = n_ctx.max(1);
        let cache = model.new_cache(n_ctx, PREFILL_CHUNK);
        Session { ws: Workspace::new(pool), caches: vec![cache], tokens: Vec::new(), n_ctx, model, trie: None, automata: AutomatonCache::default() }
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    /// Tokens currently in the cache.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Drop everything after the first `keep` cached tokens (or everything, when the cache
    /// cannot roll back that far).
    fn rewind(&mut self, keep: usize) {
        let keep = keep.min(self.tokens.len());
        if self.caches[0].truncate(keep).is_err() {
            self.caches[0].truncate(0).ok();
            self.tokens.clear();
            return;
        }
        self.tokens.truncate(keep);
    }

    /// Feed tokens after the cached ones; returns the logits of the last one.
    fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f32>, GenerateError> {
        let mut last = Vec::new();
        for chunk in tokens.chunks(PREFILL_CHUNK) {
            let start = self.tokens.len();
            let batch: Vec<BatchToken> = chunk
                .iter()
                .enumerate()
                .map(|(i, &token)| BatchToken { token, pos: start + i, seq: 0, logits: i == chunk.len() - 1 })
                .collect();
            let logits = self.model.forward(&batch, &mut self.caches, &mut self.ws)?;
            last.clear();
            last.extend_from_slice(logits);
            self.tokens.extend_from_slice(chunk);
        }
        Ok(last)
    }

    /// Make the cache hold exactly `prompt`, reusing the longest common prefix already cached,
    /// and return the logits after its last token.
    pub fn prefill(&mut self, prompt: &[u32]) -> Result<Vec<f32>, GenerateError> {
        if prompt.is_empty() {
            return Err(GenerateError::EmptyPrompt);
        }
        if prompt.len() > self.n_ctx {
            return Err(GenerateError::PromptTooLong { prompt: prompt.len(), n_ctx: self.n_ctx });
        }
        let common = self.tokens.iter().zip(prompt).take_while(|(a, b)| a == b).count();
        // Recompute at least the last prompt token to get its logits.
        self.rewind(common.min(prompt.len() - 1));
        let rest = prompt[self.tokens.len()..].to_vec();
        self.feed(&rest)
    }

    /// Generate from `prompt`. `on_step` sees each token as it is produced and returns false to
    /// stop early (finish reason `Cancelled`).
    pub fn generate(&mut self, prompt: &[u32], params: &GenerateParams, mut on_step: impl FnMut(&Step) -> bool) -> Result<Generation, GenerateError> {
        let model = self.model.clone();
        let tok = &model.tokenizer;
        params.sampling.validate(model.hp.n_vocab).map_err(GenerateError::Param)?;
        if params.stop.iter().any(|s| s.is_empty()) {
            return Err(GenerateError::Param("stop strings must not be empty".into()));
        }
        let mut logits = self.prefill(prompt)?;
        let mut sampler = Sampler::new(params.sampling.clone());
        let mut decoder = StreamDecoder::new();
        let mut stops = StopMatcher::new(&params.stop);
        let mut steps = Vec::new();
        let mut text = String::new();
        let mut history: Vec<u32> = prompt.to_vec();
        let mut constraint = match &params.grammar {
            Some(g) => {
                let trie = self.trie.get_or_insert_with(|| Arc::new(TokenTrie::new(tok))).clone();
                Some(Constraint::shared(self.automata.get(g), trie))
            }
            None => None,
        };
        let finish = loop {
            if steps.len() >= params.max_tokens {
                break FinishReason::Length;
            }
            let lse = log_sum_exp(&logits);
            let top = top_logprobs(&logits, lse, params.top_logprobs);
            let raw = logits.clone();
            let id = match constraint.as_mut() {
                None => sampler.sample(&mut logits, &history),
                Some(c) => match sample_constrained(&mut sampler, c, tok, &raw, &history) {
                    Some(id) => id,
                    None => break FinishReason::Stop,
                },
            };
            let logprob = raw[id as usize] - lse;
            history.push(id);
            let complete = constraint.as_mut().is_some_and(|c| {
                c.advance(tok, id);
                c.finished()
            });
            let end = (!params.ignore_eos || constraint.is_some()) && tok.is_end_of_generation(id);
            let piece = if end { String::new() } else { decoder.push(tok.piece(id, false)) };
            let (mut emit, stopped) = stops.push(&piece);
            if complete && !stopped {
                // The grammar is done: flush what was held back for a possible stop string.
                emit.push_str(&stops.finish(&decoder.finish()));
            }
            text.push_str(&emit);
            let step = Step { id, logprob, top, text: emit };
            let keep_going = on_step(&step);
            steps.push(step);
            if end || stopped || complete {
                break FinishReason::Stop;
            }
            if !keep_going {
                break FinishReason::Cancelled;
            }
            if self.tokens.len() >= self.n_ctx {
                break FinishReason::Length;
            }
            logits = self.feed(&[id])?;
        };
        if finish != FinishReason::Stop {
            // Flush text held back for a possible stop string or an incomplete character.
            let rest = stops.finish(&decoder.finish());
            if !rest.is_empty() {
                text.push_str(&rest);
                if let Some(last) = steps.last_mut() {
                    last.text.push_str(&rest);
                }
            }
        }
        let (grammar_secs, grammar_masks) = constraint.map_or((0.0, 0), |c| (c.spent.as_secs_f64(), c.masks_computed));
        Ok(Generation { prompt_tokens: prompt.len(), steps, text, finish, grammar_secs, grammar_masks })
    }
}

/// Finds stop strings in streamed text, holding back any tail that could be the start of one.
pub(crate) struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    pub(crate) fn new(stops: &[String]) -> Self {
        StopMatcher { stops: stops.to_vec(), held: String::new() }
    }

    /// Add text; returns (text safe to emit, whether a stop string was found).
    pub(crate) fn push(&mut self, piece: &str) -> (String, bool) {
        self.held.push_str(piece);
        if self.stops.is_empty() {
            return (std::mem::take(&mut self.held), false);
        }
        if let Some(pos) = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min() {
            let out = self.held[..pos].to_string();
            self.held.clear();
            return (out, true);
        }
        // Hold back the longest suffix that is a prefix of some stop string.
        let mut keep = 0;
        for s in &self.stops {
            for (i, _) in self.held.char_indices() {
                let tail = &self.held[i..];
                if s.starts_with(tail) {
                    keep = keep.max(tail.len());
                    break;
                }
            }
        }
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        (out, false)
    }

    pub(crate) fn finish(&mut self, rest: &str) -> String {
        self.held.push_str(rest);
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_split_across_pieces_are_found_and_held_back() {
        let stops = vec!["</end>".to_string(), "STOP".to_string()];
        let mut m = StopMatcher::new(&stops);
        assert_eq!(m.push("hello </"), ("hello ".to_string(), false));
        assert_eq!(m.push("en"), (String::new(), false));
        assert_eq!(m.push("d> tail"), (String::new(), true));
        let mut m = StopMatcher::new(&stops);
        assert_eq!(m.push("a</b"), ("a</b".to_string(), false));
        assert_eq!(m.push("ST"), (String::new(), false));
        assert_eq!(m.finish(""), "ST");
    }
}
