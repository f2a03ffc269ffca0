//! One sequence's generation loop: prefill the prompt, then sample token by token until an
//! end-of-generation token, a stop string, the token limit or the end of the context.

use crate::grammar::{sample_constrained, AutomatonCache, Compiled, Constraint, TokenTrie};
use crate::sampling::{log_sum_exp, top_logprobs, Sampler, SamplingParams};
use smelt_kernels::pool::ThreadPool;
use smelt_model::arch::{BatchToken, Model, ModelError, Workspace};
use crate::blocks::{block_hash, prefix_hashes};
use crate::disk_cache::{BlockId, DiskCache};
use smelt_model::kv::{BlockPool, KvCache, KvTypes, BLOCK_SIZE};
use smelt_model::lora::LoraSet;
use smelt_model::tokenizer::{StreamDecoder, Tokenizer};
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
    /// Report each token's log-probability (`Step::logprob`).
    pub logprobs: bool,
    /// How many alternatives to report per step (0 = none).
    pub top_logprobs: usize,
    /// Constrain the output to this grammar (generation ends when it is complete).
    pub grammar: Option<Compiled>,
}

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams { max_tokens: 256, sampling: SamplingParams::default(), stop: Vec::new(), ignore_eos: false, logprobs: false, top_logprobs: 0, grammar: None }
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
    /// Log-probability of `id` under the model (before sampling filters), when asked for
    /// (`GenerateParams::logprobs` or `top_logprobs`: it costs a pass over the vocabulary).
    pub logprob: Option<f32>,
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
    /// The adapters every token runs under (empty: the base model).
    lora: LoraSet,
    /// The persistent prefix cache and the model file's digest, when used.
    disk: Option<(Arc<DiskCache>, u64)>,
    /// Hashes of the full blocks of `tokens` already on disk (or written there).
    disk_hashes: Vec<u64>,
    /// Prompt tokens read back from the disk cache so far.
    pub disk_read_tokens: usize,
}

impl Session {
    pub fn new(model: Arc<Model>, pool: Arc<ThreadPool>, n_ctx: usize) -> Session {
        let n_ctx = n_ctx.max(1);
        let cache = model.new_cache(n_ctx, PREFILL_CHUNK);
        Session {
            ws: Workspace::new(pool),
            caches: vec![cache],
            tokens: Vec::new(),
            n_ctx,
            model,
            trie: None,
            automata: AutomatonCache::default(),
            lora: LoraSet::default(),
            disk: None,
            disk_hashes: Vec::new(),
            disk_read_tokens: 0,
        }
    }

    /// Keep the KV of every full block computed in `cache` (the server's `--kv-cache-dir`
    /// format) and read blocks back from there for prompts that start the same way. Reads the
    /// model file once, for its digest; the cache is emptied.
    pub fn set_disk_cache(&mut self, cache: Arc<DiskCache>) -> std::io::Result<()> {
        let digest = smelt_model::gguf::file_digest(&self.model.file.path)?;
        self.rewind(0);
        self.disk = Some((cache, digest));
        Ok(())
    }

    /// The disk cache and this session's namespace in it (which depends on the KV types).
    fn disk_namespace(&self) -> Option<(Arc<DiskCache>, u64)> {
        let (cache, digest) = self.disk.as_ref()?;
        Some((cache.clone(), DiskCache::namespace(*digest, self.caches[0].types, self.model.hp.n_layer, self.model.kv_row())))
    }

    /// Write the full blocks computed since the last call that the disk does not have yet.
    fn save_blocks(&mut self) {
        // Called after every decoded token: only a newly completed block costs anything.
        if self.disk_hashes.len() >= self.tokens.len() / BLOCK_SIZE {
            return;
        }
        let Some((cache, ns)) = self.disk_namespace() else { return };
        let mut bytes = Vec::new();
        while self.disk_hashes.len() < self.tokens.len() / BLOCK_SIZE {
            let i = self.disk_hashes.len();
            let parent = self.disk_hashes.last().copied().unwrap_or_else(|| self.lora.key());
            let tokens = &self.tokens[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE];
            let hash = block_hash(parent, tokens);
            if !cache.contains(ns, hash) {
                bytes.clear();
                if !self.caches[0].save_block(i * BLOCK_SIZE, &mut bytes) {
                    return;
                }
                cache.put(ns, &BlockId { parent, hash, tokens }, &bytes);
            }
            self.disk_hashes.push(hash);
        }
    }

    /// Extend the cache along `prompt` with the blocks the disk has (never its last token,
    /// whose logits are needed).
    fn read_blocks(&mut self, prompt: &[u32]) {
        let Some((cache, ns)) = self.disk_namespace() else { return };
        let usable = (prompt.len() - 1) / BLOCK_SIZE;
        let first = self.tokens.len() / BLOCK_SIZE;
        if first >= usable {
            return;
        }
        let root = self.lora.key();
        let hashes = prefix_hashes(root, &prompt[..usable * BLOCK_SIZE]);
        if !cache.contains(ns, hashes[first]) {
            return;
        }
        // Start at a block boundary (a partly filled last block is recomputed from disk).
        self.rewind(first * BLOCK_SIZE);
        let mut i = self.tokens.len() / BLOCK_SIZE;
        self.disk_hashes = hashes[..i].to_vec();
        let len = BlockPool::block_bytes(self.model.hp.n_layer, self.model.kv_row(), self.caches[0].types);
        while i < usable {
            let tokens = &prompt[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE];
            let id = BlockId { parent: if i == 0 { root } else { hashes[i - 1] }, hash: hashes[i], tokens };
            let Some(bytes) = cache.get(ns, &id, len) else { break };
            if !self.caches[0].load_block(i * BLOCK_SIZE, &bytes) {
                break;
            }
            self.tokens.extend_from_slice(tokens);
            self.caches[0].len = self.tokens.len();
            self.disk_hashes.push(hashes[i]);
            self.disk_read_tokens += BLOCK_SIZE;
            i += 1;
        }
    }

    /// Store keys and values in `types` from now on (the cache is dropped); an error when the
    /// model's head size does not suit them.
    pub fn set_kv_types(&mut self, types: KvTypes) -> Result<(), ModelError> {
        self.caches = vec![self.model.new_cache_typed(self.n_ctx, PREFILL_CHUNK, types)?];
        self.tokens.clear();
        self.disk_hashes.clear();
        Ok(())
    }

    /// Run under these adapters from now on (the cache, computed without them, is dropped).
    pub fn set_lora(&mut self, lora: LoraSet) {
        self.rewind(0);
        self.lora = lora;
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
            self.disk_hashes.clear();
            return;
        }
        self.tokens.truncate(keep);
        self.disk_hashes.truncate(keep / BLOCK_SIZE);
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
            let logits = self.model.forward_lora(&batch, &mut self.caches, &mut self.ws, &[&self.lora])?;
            last.clear();
            last.extend_from_slice(logits);
            self.tokens.extend_from_slice(chunk);
            self.save_blocks();
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
        self.read_blocks(prompt);
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
        let constraint = match &params.grammar {
            None => None,
            Some(g) => {
                let trie = self.trie.get_or_insert_with(|| Arc::new(TokenTrie::new(tok))).clone();
                Some(Constraint::shared(self.automata.get(g).map_err(|e| GenerateError::Param(e.to_string()))?, trie))
            }
        };
        let mut dec = Decoding::new(params, constraint);
        let mut steps: Vec<Step> = Vec::new();
        let mut text = String::new();
        let finish = loop {
            if params.max_tokens == 0 {
                break FinishReason::Length;
            }
            // The cache holds the prompt and every token so far (the history the sampler
            // needs); the sampled token still has to go in to continue.
            let room = self.tokens.len() < self.n_ctx;
            let (step, finish) = match dec.next(tok, &logits, &self.tokens, room) {
                Next::Token(step, finish) => (step, finish),
                Next::Stuck => break FinishReason::Stop,
                Next::Failed(e) => return Err(GenerateError::Param(e)),
            };
            let id = step.id;
            text.push_str(&step.text);
            let keep_going = on_step(&step);
            steps.push(step);
            if let Some(finish) = finish {
                break finish;
            }
            if !keep_going {
                // Release text held back for a possible stop string or an incomplete character.
                let rest = dec.flush();
                text.push_str(&rest);
                if let Some(last) = steps.last_mut() {
                    last.text.push_str(&rest);
                }
                break FinishReason::Cancelled;
            }
            logits = self.feed(&[id])?;
        };
        let constraint = dec.constraint;
        let (grammar_secs, grammar_masks) = constraint.map_or((0.0, 0), |c| (c.spent.as_secs_f64(), c.masks_computed));
        Ok(Generation { prompt_tokens: prompt.len(), steps, text, finish, grammar_secs, grammar_masks })
    }
}

/// What [`Decoding::next`] produced.
pub(crate) enum Next {
    /// A token, and the reason generation ends with it, if it does.
    Token(Step, Option<FinishReason>),
    /// Nothing in the vocabulary can continue the grammar.
    Stuck,
    /// The grammar went over its work budget: the sequence ends in this error.
    Failed(String),
}

/// One sequence's token-by-token state — sampler, grammar, text decoding, stop strings and
/// limits — shared by [`Session::generate`] and the serving engine, so both take the same step.
pub(crate) struct Decoding {
    sampler: Sampler,
    decoder: StreamDecoder,
    stops: StopMatcher,
    pub(crate) constraint: Option<Constraint>,
    /// Tokens sampled so far.
    pub(crate) generated: usize,
    logprobs: bool,
    top_logprobs: usize,
    ignore_eos: bool,
    max_tokens: usize,
}

impl Decoding {
    pub(crate) fn new(params: &GenerateParams, constraint: Option<Constraint>) -> Decoding {
        Decoding {
            sampler: Sampler::new(params.sampling.clone()),
            decoder: StreamDecoder::new(),
            stops: StopMatcher::new(&params.stop),
            constraint,
            generated: 0,
            logprobs: params.logprobs,
            top_logprobs: params.top_logprobs,
            ignore_eos: params.ignore_eos,
            max_tokens: params.max_tokens,
        }
    }

    /// Sample the token after `history` (prompt and tokens so far) from the model's `logits`
    /// for it, and say whether generation ends with it; `room`: whether the context can take
    /// another token after this one. When it ends for length or a finished grammar, the step's
    /// text includes everything held back.
    pub(crate) fn next(&mut self, tok: &Tokenizer, logits: &[f32], history: &[u32], room: bool) -> Next {
        let lse = (self.logprobs || self.top_logprobs > 0).then(|| log_sum_exp(logits));
        let top = lse.map_or_else(Vec::new, |lse| top_logprobs(logits, lse, self.top_logprobs));
        let id = match self.constraint.as_mut() {
            None => self.sampler.sample(logits, history),
            Some(c) => match sample_constrained(&mut self.sampler, c, tok, logits, history) {
                Some(id) => id,
                None => return c.error.as_ref().map_or(Next::Stuck, |e| Next::Failed(e.to_string())),
            },
        };
        let logprob = lse.map(|lse| logits[id as usize] - lse);
        self.generated += 1;
        let complete = self.constraint.as_mut().is_some_and(|c| {
            c.advance(tok, id);
            c.finished()
        });
        if let Some(e) = self.constraint.as_ref().and_then(|c| c.error.as_ref()) {
            return Next::Failed(e.to_string());
        }
        let end = (!self.ignore_eos || self.constraint.is_some()) && tok.is_end_of_generation(id);
        let piece = if end { String::new() } else { self.decoder.push(tok.piece(id, false)) };
        let (mut text, stopped) = self.stops.push(&piece);
        let finish = if end || stopped || complete {
            Some(FinishReason::Stop)
        } else if self.generated >= self.max_tokens || !room {
            Some(FinishReason::Length)
        } else {
            None
        };
        if finish == Some(FinishReason::Length) || (complete && !stopped) {
            text.push_str(&self.flush());
        }
        Next::Token(Step { id, logprob, top, text }, finish)
    }

    /// Text held back for a possible stop string or an incomplete character.
    pub(crate) fn flush(&mut self) -> String {
        self.stops.finish(&self.decoder.finish())
    }
}

/// Finds stop strings in streamed text, holding back any tail that could be the start of one.
struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    fn new(stops: &[String]) -> Self {
        StopMatcher { stops: stops.to_vec(), held: String::new() }
    }

    /// Add text; returns (text safe to emit, whether a stop string was found).
    fn push(&mut self, piece: &str) -> (String, bool) {
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

    fn finish(&mut self, rest: &str) -> String {
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
