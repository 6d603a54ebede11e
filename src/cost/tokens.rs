//! Prompt-token counting.
//!
//! For OpenAI-family models the count uses the model's real tokenizer (tiktoken: o200k_base or
//! cl100k_base) plus the chat framing overhead (3 tokens per message, 3 to prime the reply),
//! and the structured-output schema is counted as text, as it is sent to the model. The
//! planner, the budget cap and the simulator all call this one function, so what we plan is
//! what the simulator bills. Models without a known tokenizer get a conservative estimate
//! (one token per 3 bytes), flagged as such wherever it shows.

use tiktoken_rs::CoreBPE;

/// Overhead tokens framing each chat message.
pub const TOKENS_PER_MESSAGE: u64 = 3;
/// Tokens that prime the assistant's reply, once per request.
pub const REPLY_PRIMING: u64 = 3;

/// A token counter for one model.
#[derive(Clone, Copy)]
pub struct Tokenizer {
    bpe: Option<&'static CoreBPE>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("exact", &self.is_exact())
            .finish()
    }
}

impl Tokenizer {
    /// The exact tokenizer for an OpenAI model, or the estimator for anything else.
    pub fn for_model(model: &str) -> Self {
        use tiktoken_rs::tokenizer::{Tokenizer as T, get_tokenizer};
        let bpe = match get_tokenizer(model) {
            Some(t @ (T::O200kBase | T::Cl100kBase | T::O200kHarmony)) => {
                tiktoken_rs::bpe_for_tokenizer(t).ok()
            }
            _ => None,
        };
        Tokenizer { bpe }
    }

    /// The conservative estimator, whatever the model.
    pub fn estimator() -> Self {
        Tokenizer { bpe: None }
    }

    pub fn is_exact(&self) -> bool {
        self.bpe.is_some()
    }

    pub fn count(&self, text: &str) -> u64 {
        match self.bpe {
            Some(bpe) => bpe.count_ordinary(text) as u64,
            None => (text.len() as u64).div_ceil(3),
        }
    }

    /// The first `max_tokens` tokens of `text` (for truncated answers in the simulator).
    pub fn truncate(&self, text: &str, max_tokens: u64) -> String {
        match self.bpe {
            Some(bpe) => {
                let toks = bpe.encode_ordinary(text);
                if toks.len() as u64 <= max_tokens {
                    return text.to_string();
                }
                let mut n = max_tokens as usize;
                // A cut inside a multi-byte character cannot decode: back off a token.
                loop {
                    if let Ok(s) = bpe.decode(&toks[..n]) {
                        return s;
                    }
                    if n == 0 {
                        return String::new();
                    }
                    n -= 1;
                }
            }
            None => {
                let mut end = (max_tokens as usize * 3).min(text.len());
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                text[..end].to_string()
            }
        }
    }

    /// Prompt tokens of a chat request: framing + role + content per message, reply
    /// priming, and the response-format schema text when there is one.
    pub fn chat_prompt_tokens<'a>(
        &self,
        messages: impl IntoIterator<Item = (&'a str, &'a str)>,
        response_format_json: Option<&str>,
    ) -> u64 {
        let mut n = REPLY_PRIMING;
        for (role, content) in messages {
            n += TOKENS_PER_MESSAGE + self.count(role) + self.count(content);
        }
        if let Some(rf) = response_format_json {
            n += self.count(rf);
        }
        n
    }
}

/// Counts the prompt tokens of every request of one shape: a fixed part (system message,
/// framing, schema) counted once, plus the user message.
#[derive(Clone, Copy, Debug)]
pub struct PromptCounter {
    pub tokenizer: Tokenizer,
    pub fixed: u64,
}

impl PromptCounter {
    /// The counter for chat requests to `model`: the system message (if any), an empty user
    /// message's framing and `extra` (the schema or tool definition as sent) counted once.
    pub fn for_chat(model: &str, system: Option<&str>, extra: &str) -> Self {
        let tokenizer = Tokenizer::for_model(model);
        let messages = system
            .map(|s| ("system", s))
            .into_iter()
            .chain([("user", "")]);
        PromptCounter {
            tokenizer,
            fixed: tokenizer.chat_prompt_tokens(messages, Some(extra)),
        }
    }

    pub fn count(&self, user_message: &str) -> u64 {
        self.fixed + self.tokenizer.count(user_message)
    }

    /// Whether counts are exact (the model's tokenizer) or an estimate.
    pub fn is_exact(&self) -> bool {
        self.tokenizer.is_exact()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_models_count_exactly() {
        let t = Tokenizer::for_model("gpt-5.4-mini");
        assert!(t.is_exact());
        // "hello world" is two tokens in o200k_base
        assert_eq!(t.count("hello world"), 2);
        assert_eq!(
            t.chat_prompt_tokens([("user", "hello world")], None),
            3 + 3 + 1 + 2
        );
    }

    #[test]
    fn unknown_models_are_estimated_conservatively() {
        let t = Tokenizer::for_model("claude-haiku-4-5");
        assert!(!t.is_exact());
        assert_eq!(t.count("abcdefg"), 3);
    }

    #[test]
    fn truncation_keeps_a_prefix_within_the_budget() {
        let t = Tokenizer::for_model("gpt-4o");
        let s = "The quick brown fox jumps over the lazy dog, again and again.";
        let cut = t.truncate(s, 5);
        assert!(s.starts_with(&cut));
        assert!(t.count(&cut) <= 5);
        assert_eq!(t.truncate(s, 1000), s);
    }
}
