//! Arbitrary bytes as a GGUF file: parsing, then building a tokenizer and reading the model's
//! hyperparameters from whatever parsed, must return errors, never panic or read out of bounds.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(header) = smelt_model::gguf::parse(data) {
        let _ = smelt_model::tokenizer::Tokenizer::from_gguf(&header);
        for (k, _) in &header.metadata {
            let _ = header.get_u64(k);
            let _ = header.get_f32(k);
            let _ = header.get_str(k);
        }
    }
});
