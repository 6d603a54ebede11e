//! Prompt-token counting.
//!
//! For OpenAI-family models the count uses the model's real tokenizer (tiktoken: o200k_base or
//! cl100k_base) plus the chat framing overhead (3 tokens per message, 3 to prime the reply),
//! and the structured-output schema is counted as text, as it is sent to the model. The
//! planner, the budget cap and the simulator all call this one function, so what we plan is
//! what the simulator bills. Models without a known tokenizer get a conservative estimate
//! (one token per 3 bytes), flagged as such wherever it shows.

use std::cell::RefCell;
use std::hash::BuildHasher;
use std::sync::LazyLock;

use hashbrown::HashTable;
use regex_automata::meta::{Cache, Regex};
use regex_automata::{Anchored, Input};
use rustc_hash::{FxBuildHasher, FxHashMap};
use tiktoken_rs::CoreBPE;

/// Overhead tokens framing each chat message.
pub const TOKENS_PER_MESSAGE: u64 = 3;
/// Tokens that prime the assistant's reply, once per request.
pub const REPLY_PRIMING: u64 = 3;

/// An OpenAI byte-pair encoding the counter knows exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Encoding {
    O200k,
    Cl100k,
}

/// The vocabulary's split pattern with its one look-ahead, `\s+(?!\S)`, rewritten for a
/// regex engine without look-around: `\s+$` joins the first pattern, and `\s+\s` (a second
/// pattern) matches one whitespace character too many, which the splitter gives back.
/// (The same rewrite as the `bpe-openai` crate's, tested there against tiktoken.)
const O200K_PATTERNS: [&str; 3] = [
    concat!(
        "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        "|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        "|\\p{N}{1,3}",
        "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*",
        "|\\s*[\\r\\n]+",
        "|\\s+$",
    ),
    "\\s+\\s",
    "\\s+",
];
const CL100K_PATTERNS: [&str; 3] = [
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+$",
    "\\s+\\s",
    "\\s+",
];
/// Which of the patterns above ends in a look-ahead character.
const LOOKAHEAD: [bool; 3] = [false, true, false];

/// A vocabulary for counting: the split pattern and the merge ranks of every token.
///
/// Counting is what the hot path does (every request's prompt, at ingest), so it does not go
/// through tiktoken-rs's `CoreBPE`: that splits with a backtracking regex whose scratch space
/// a thread other than its first user takes from a locked pool, and keeps the vocabulary
/// three times over (encoder, decoder, sorted bytes). Here the split is one multi-pattern
/// DFA search per piece with a cache owned by the calling thread, a piece that is one token
/// (most are) costs a hash look-up, and other pieces are merged by tiktoken's
/// byte-pair merge over the same ranks ([`Ranks`], a fifth of the memory of a map of owned
/// keys). The counts are tiktoken's, token for token: the tests compare them on the example
/// data, on unicode and on random text.
struct Vocab {
    encoding: Encoding,
    /// Built on the first text that is not all ASCII (o200k) or on the first text (cl100k).
    split: LazyLock<Regex, fn() -> Regex>,
    ranks: Ranks,
}

impl Vocab {
    fn load(encoding: Encoding) -> Vocab {
        let bpe = match encoding {
            Encoding::O200k => tiktoken_rs::o200k_base(),
            Encoding::Cl100k => tiktoken_rs::cl100k_base(),
        };
        let bpe = bpe.expect("the embedded vocabulary loads");
        let split: LazyLock<Regex, fn() -> Regex> = match encoding {
            Encoding::O200k => LazyLock::new(|| {
                Regex::new_many(&O200K_PATTERNS).expect("the split patterns compile")
            }),
            Encoding::Cl100k => LazyLock::new(|| {
                Regex::new_many(&CL100K_PATTERNS).expect("the split patterns compile")
            }),
        };
        let specials: std::collections::HashSet<&[u8]> = bpe
            .special_tokens()
            .into_iter()
            .map(str::as_bytes)
            .collect();
        // Ranks are dense from 0: read each token's bytes back until the vocabulary ends
        // (special tokens, above it, are never produced by ordinary text).
        let mut ranks = Ranks::default();
        let mut misses = 0;
        for rank in 0u32.. {
            match bpe.decode_bytes(&[rank]) {
                Ok(bytes) if !specials.contains(bytes.as_slice()) => {
                    misses = 0;
                    ranks.push(rank, &bytes);
                }
                _ => {
                    misses += 1;
                    if misses > 1024 {
                        break;
                    }
                }
            }
        }
        ranks.shrink_to_fit();
        Vocab {
            encoding,
            split,
            ranks,
        }
    }

    /// Tokens in one piece of the split. Short pieces are looked up first among the ones
    /// this thread counted last (`recent`); a piece that is not one token is merged once
    /// per thread and remembered (words recur: a few thousand make most of a job's text).
    fn piece(&self, recent: &mut Recent, piece: &[u8]) -> u64 {
        let hash = Ranks::hash(piece);
        if let Some(n) = recent.get(hash, piece) {
            return u64::from(n);
        }
        let n = self.piece_uncached(hash, piece);
        recent.put(hash, piece, n);
        n
    }

    /// [`Vocab::piece`] without the table of recent pieces; `hash` is the piece's.
    fn piece_uncached(&self, hash: u64, piece: &[u8]) -> u64 {
        /// Pieces remembered per thread before the memory starts afresh.
        const MEMO: usize = 1 << 16;
        thread_local! {
            static MERGED: RefCell<[FxHashMap<Box<[u8]>, u32>; 2]> = RefCell::default();
        }
        if self.ranks.get_hashed(hash, piece).is_some() {
            return 1;
        }
        MERGED.with(|m| {
            let m = &mut m.borrow_mut()[self.encoding as usize];
            if let Some(&n) = m.get(piece) {
                return u64::from(n);
            }
            let n = self.ranks.merged_len(piece);
            if m.len() >= MEMO {
                m.clear();
            }
            m.insert(piece.into(), n);
            u64::from(n)
        })
    }

    fn count(&self, encoding: Encoding, text: &str) -> u64 {
        thread_local! {
            static RECENT: RefCell<[Option<Box<Recent>>; 2]> = const { RefCell::new([None, None]) };
        }
        RECENT.with(|r| {
            let mut r = r.borrow_mut();
            let recent = r[encoding as usize].get_or_insert_with(Recent::new);
            self.count_with(encoding, recent, text)
        })
    }

    fn count_with(&self, encoding: Encoding, recent: &mut Recent, text: &str) -> u64 {
        let s = text.as_bytes();
        let mut n = 0u64;
        let mut at = 0;
        while at < s.len() {
            // An o200k piece whose every character the splitter looked at is ASCII is the
            // regex's piece; anything else takes the regex.
            if encoding == Encoding::O200k && s[at].is_ascii() {
                let (end, seen) = o200k_ascii_piece(s, at);
                if s[at..seen.min(s.len())].is_ascii() {
                    n += self.piece(recent, &s[at..end]);
                    at = end;
                    continue;
                }
            }
            let rest = &text[at..];
            let Some(end) = self.split_at(encoding, rest) else {
                // Every character starts some piece; should that ever not hold, the
                // reference tokenizer counts the rest.
                return n + tiktoken(encoding).encode_ordinary(rest).len() as u64;
            };
            n += self.piece(recent, &rest.as_bytes()[..end]);
            at += end;
        }
        n
    }

    /// The length of the split's first piece of `rest` (never 0), by the regex.
    fn split_at(&self, encoding: Encoding, rest: &str) -> Option<usize> {
        thread_local! {
            static CACHES: RefCell<[Option<Cache>; 2]> = const { RefCell::new([None, None]) };
        }
        CACHES.with(|caches| {
            let mut caches = caches.borrow_mut();
            let cache = caches[encoding as usize].get_or_insert_with(|| self.split.create_cache());
            let m = self
                .split
                .search_with(cache, &Input::new(rest).anchored(Anchored::Yes))?;
            let mut end = m.end();
            if LOOKAHEAD[m.pattern().as_usize()] {
                end -= rest[..end].chars().next_back().map_or(0, char::len_utf8);
            }
            (end > 0).then_some(end)
        })
    }
}

/// The longest piece [`Recent`] keeps.
const RECENT_LEN: usize = 22;

/// The token counts of the short pieces a thread counted last, one per slot of a small table
/// indexed by the piece's hash (96 KB: small enough to stay in the processor's caches, where
/// the 3 MB rank table does not). A slot holds the piece's bytes and is used only on an exact match,
/// so a count never comes from another piece; a newer piece takes the slot of an older one.
/// Text repeats its words, so most pieces are found here.
struct Recent {
    slots: Box<[RecentSlot]>,
}

#[derive(Clone, Copy)]
struct RecentSlot {
    /// 0: empty (no piece is empty).
    len: u8,
    count: u8,
    bytes: [u8; RECENT_LEN],
}

impl Recent {
    const BITS: u32 = 12;

    fn new() -> Box<Recent> {
        let empty = RecentSlot {
            len: 0,
            count: 0,
            bytes: [0; RECENT_LEN],
        };
        Box::new(Recent {
            slots: vec![empty; 1 << Self::BITS].into_boxed_slice(),
        })
    }

    fn slot(hash: u64) -> usize {
        // The hash's high bits, mixed: FxHash's low bits vary little across short pieces.
        (hash.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - Self::BITS)) as usize
    }

    fn get(&self, hash: u64, piece: &[u8]) -> Option<u8> {
        let s = &self.slots[Self::slot(hash)];
        (usize::from(s.len) == piece.len() && same_start(&s.bytes, piece)).then_some(s.count)
    }

    /// Remembers `piece` (at most [`RECENT_LEN`] bytes, so at most that many tokens).
    fn put(&mut self, hash: u64, piece: &[u8], count: u64) {
        if piece.len() > RECENT_LEN {
            return;
        }
        let (Ok(len), Ok(count)) = (u8::try_from(piece.len()), u8::try_from(count)) else {
            return;
        };
        let s = &mut self.slots[Self::slot(hash)];
        s.len = len;
        s.count = count;
        s.bytes[..piece.len()].copy_from_slice(piece);
    }
}

/// Whether `bytes` starts with `piece` (at most as long): eight bytes at a time, in line
/// rather than a library call for every piece.
fn same_start(bytes: &[u8; RECENT_LEN], piece: &[u8]) -> bool {
    let word = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("eight bytes"));
    let mut i = 0;
    while i + 8 <= piece.len() {
        if word(&bytes[i..i + 8]) != word(&piece[i..i + 8]) {
            return false;
        }
        i += 8;
    }
    bytes[i..piece.len()]
        .iter()
        .zip(&piece[i..])
        .all(|(a, b)| a == b)
}

/// Every token's bytes in one buffer, in rank order, and a hash table of ranks that finds
/// them: about 3 MB for o200k, where a map of owned keys takes 13.
#[derive(Default)]
struct Ranks {
    bytes: Vec<u8>,
    /// `ends[r]`: where token `r` ends in `bytes` (it starts where `r - 1` ends). A rank the
    /// vocabulary skips is empty and never in `table`.
    ends: Vec<u32>,
    table: HashTable<u32>,
}

impl Ranks {
    fn hash(bytes: &[u8]) -> u64 {
        FxBuildHasher.hash_one(bytes)
    }

    /// Token `rank`'s bytes, from the buffer and its ends.
    fn slice<'a>(bytes: &'a [u8], ends: &[u32], rank: u32) -> &'a [u8] {
        let r = rank as usize;
        let start = if r == 0 { 0 } else { ends[r - 1] as usize };
        &bytes[start..ends[r] as usize]
    }

    fn token(&self, rank: u32) -> &[u8] {
        Self::slice(&self.bytes, &self.ends, rank)
    }

    /// Adds token `rank` (ranks come in increasing order).
    fn push(&mut self, rank: u32, token: &[u8]) {
        let end = |b: &Vec<u8>| u32::try_from(b.len()).expect("a vocabulary under 4 GB");
        self.ends.resize(rank as usize, end(&self.bytes));
        self.bytes.extend_from_slice(token);
        self.ends.push(end(&self.bytes));
        let Self { bytes, ends, table } = self;
        table.insert_unique(Self::hash(token), rank, |&r| {
            Self::hash(Self::slice(bytes, ends, r))
        });
    }

    fn shrink_to_fit(&mut self) {
        self.bytes.shrink_to_fit();
        self.ends.shrink_to_fit();
        let Self { bytes, ends, table } = self;
        table.shrink_to_fit(|&r| Self::hash(Self::slice(bytes, ends, r)));
    }

    fn get(&self, piece: &[u8]) -> Option<u32> {
        self.get_hashed(Self::hash(piece), piece)
    }

    /// [`Ranks::get`] with the piece's hash already taken.
    fn get_hashed(&self, hash: u64, piece: &[u8]) -> Option<u32> {
        self.table.find(hash, |&r| self.token(r) == piece).copied()
    }

    /// Tokens in `piece` (at least two bytes long) after byte-pair merging: tiktoken's
    /// `_byte_pair_merge`, which merges the adjacent pair of lowest rank until none is a token.
    fn merged_len(&self, piece: &[u8]) -> u32 {
        // (start, rank of the pair starting there)
        let mut parts: Vec<(usize, u32)> = Vec::with_capacity(piece.len() + 1);
        let mut min_rank = (u32::MAX, usize::MAX);
        for i in 0..piece.len() - 1 {
            let rank = self.get(&piece[i..i + 2]).unwrap_or(u32::MAX);
            if rank < min_rank.0 {
                min_rank = (rank, i);
            }
            parts.push((i, rank));
        }
        parts.push((piece.len() - 1, u32::MAX));
        parts.push((piece.len(), u32::MAX));
        let rank_at = |parts: &[(usize, u32)], i: usize| {
            if i + 3 < parts.len() {
                // parts[i + 1] is still there: it goes once both neighbours are updated.
                self.get(&piece[parts[i].0..parts[i + 3].0])
                    .unwrap_or(u32::MAX)
            } else {
                u32::MAX
            }
        };
        while min_rank.0 != u32::MAX {
            let i = min_rank.1;
            if i > 0 {
                parts[i - 1].1 = rank_at(&parts, i - 1);
            }
            parts[i].1 = rank_at(&parts, i);
            parts.remove(i + 1);
            min_rank = (u32::MAX, usize::MAX);
            for (i, &(_, rank)) in parts[..parts.len() - 1].iter().enumerate() {
                if rank < min_rank.0 {
                    min_rank = (rank, i);
                }
            }
        }
        (parts.len() - 1) as u32
    }
}

/// The o200k split piece that starts at `i`, taking the text as ASCII: the split pattern's
/// alternatives in its order, each as the regex matches it, over the ASCII members of its
/// classes (letters `A-Z` and `a-z`, no marks or other letter kinds; digits `0-9`; whitespace
/// `\t \n \x0B \x0C \r` and space). Returns the piece's end and how far it looked: when
/// every byte up to there is ASCII, the piece is the regex's. The tests hold it against
/// tiktoken.
fn o200k_ascii_piece(s: &[u8], i: usize) -> (usize, usize) {
    let ws = |b: u8| matches!(b, b'\t' | b'\n' | 0x0B | 0x0C | b'\r' | b' ');
    let punct = |b: u8| !ws(b) && !b.is_ascii_alphanumeric();
    let at = |k: usize| s.get(k).copied();
    let run = |mut k: usize, f: &dyn Fn(u8) -> bool| {
        while k < s.len() && f(s[k]) {
            k += 1;
        }
        k
    };
    // `(?i:'s|'t|'re|'ve|'m|'ll|'d)?` after a word.
    let contraction = |k: usize| -> usize {
        if at(k) != Some(b'\'') {
            return k;
        }
        let lower = |j: usize| at(j).map(|b| b.to_ascii_lowercase());
        match lower(k + 1) {
            Some(b's' | b't' | b'm' | b'd') => k + 2,
            Some(b'r') if lower(k + 2) == Some(b'e') => k + 3,
            Some(b'v') if lower(k + 2) == Some(b'e') => k + 3,
            Some(b'l') if lower(k + 2) == Some(b'l') => k + 3,
            _ => k,
        }
    };
    let c = s[i];
    // A word: one optional leading character that is not a letter, digit, CR or LF, then
    // `[A-Z]*[a-z]+` or else `[A-Z]+[a-z]*`, then a contraction.
    let start = if c.is_ascii_alphabetic() {
        Some(i)
    } else if c != b'\r' && c != b'\n' && !c.is_ascii_digit() {
        at(i + 1).filter(u8::is_ascii_alphabetic).map(|_| i + 1)
    } else {
        None
    };
    if let Some(w) = start {
        let upper = run(w, &|b| b.is_ascii_uppercase());
        let lower = run(upper, &|b| b.is_ascii_lowercase());
        // Either way the word is the upper-case run then the lower-case run; only its
        // first letter must be a letter, which `start` checked.
        return (contraction(lower), lower + 3);
    }
    if c.is_ascii_digit() {
        let end = run(i, &|b| b.is_ascii_digit());
        return (end.min(i + 3), end + 1);
    }
    // ` ?[^\s\p{L}\p{N}]+[\r\n/]*`
    let p = if c == b' ' && at(i + 1).is_some_and(punct) {
        i + 1
    } else {
        i
    };
    if punct(s[p]) {
        let end = run(p, &punct);
        let end = run(end, &|b| b == b'\r' || b == b'\n' || b == b'/');
        return (end, end + 1);
    }
    // Whitespace: `\s*[\r\n]+` up to the run's last line break, else the whole run at the
    // end of the text, else all but its last character, else the one character.
    let end = run(i, &ws);
    let seen = end + 1;
    if let Some(q) = s[i..end].iter().rposition(|&b| b == b'\r' || b == b'\n') {
        return (i + q + 1, seen);
    }
    if end == s.len() || end - i == 1 {
        (end, seen)
    } else {
        (end - 1, seen)
    }
}

static O200K: LazyLock<Vocab> = LazyLock::new(|| Vocab::load(Encoding::O200k));
static CL100K: LazyLock<Vocab> = LazyLock::new(|| Vocab::load(Encoding::Cl100k));

impl Encoding {
    fn vocab(self) -> &'static Vocab {
        match self {
            Encoding::O200k => &O200K,
            Encoding::Cl100k => &CL100K,
        }
    }
}

/// tiktoken-rs's encoder (truncating an answer in the simulator, and the count's fallback).
fn tiktoken(encoding: Encoding) -> &'static CoreBPE {
    match encoding {
        Encoding::O200k => tiktoken_rs::o200k_base_singleton(),
        Encoding::Cl100k => tiktoken_rs::cl100k_base_singleton(),
    }
}

/// A token counter for one model.
#[derive(Clone, Copy)]
pub struct Tokenizer {
    encoding: Option<Encoding>,
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
        let encoding = match get_tokenizer(model) {
            Some(T::O200kBase | T::O200kHarmony) => Some(Encoding::O200k),
            Some(T::Cl100kBase) => Some(Encoding::Cl100k),
            _ => None,
        };
        Tokenizer { encoding }
    }

    /// The conservative estimator, whatever the model.
    pub fn estimator() -> Self {
        Tokenizer { encoding: None }
    }

    pub fn is_exact(&self) -> bool {
        self.encoding.is_some()
    }

    pub fn count(&self, text: &str) -> u64 {
        match self.encoding {
            Some(e) => e.vocab().count(e, text),
            None => (text.len() as u64).div_ceil(3),
        }
    }

    /// The first `max_tokens` tokens of `text` (for truncated answers in the simulator).
    pub fn truncate(&self, text: &str, max_tokens: u64) -> String {
        match self.encoding {
            Some(e) => {
                let bpe = tiktoken(e);
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

    /// The reference count: tiktoken-rs's own encoder.
    fn reference(t: &Tokenizer, text: &str) -> u64 {
        tiktoken(t.encoding.expect("an exact tokenizer"))
            .encode_ordinary(text)
            .len() as u64
    }

    fn both_encodings() -> [Tokenizer; 2] {
        let (o, c) = (
            Tokenizer::for_model("gpt-4o-mini"),
            Tokenizer::for_model("gpt-4"),
        );
        assert_eq!(o.encoding, Some(Encoding::O200k));
        assert_eq!(c.encoding, Some(Encoding::Cl100k));
        [o, c]
    }

    #[test]
    fn counts_equal_tiktoken_on_the_example_data() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/examples/data");
        let mut texts = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
            for line in text.lines() {
                texts.push(line.to_string());
                // The fields as a template renders them, one by one.
                if let Ok(serde_json::Value::Object(m)) = serde_json::from_str(line) {
                    texts.extend(m.values().filter_map(|v| v.as_str().map(str::to_string)));
                }
            }
            texts.push(text);
        }
        assert!(texts.len() > 500, "{} texts", texts.len());
        for t in both_encodings() {
            for text in &texts {
                assert_eq!(t.count(text), reference(&t, text), "{:?}", preview(text));
            }
        }
    }

    fn preview(s: &str) -> String {
        s.chars().take(120).collect()
    }

    #[test]
    fn counts_equal_tiktoken_on_unicode_and_whitespace() {
        let samples = [
            "",
            " ",
            "   ",
            "a  b",
            "a \n b",
            "x\r\n\r\n  y  ",
            "tabs\t\tand\u{a0}no-break\u{3000}ideographic\u{2028}line sep",
            "trailing spaces   ",
            "\n\n\n",
            "日本語のテキストと English の混在。",
            "中文：价格为 ¥1,299.00（含税）",
            "Ελληνικά και кириллица, עברית ועברית, العربية ١٢٣٤٥",
            "emoji 😀👍🏽 family 👨‍👩‍👧 flags 🇫🇷🇩🇪",
            "combining: e\u{301} a\u{308}\u{301} Zalgo z\u{336}\u{337}",
            "CAPS and MiXeD ǅungla ʰmod İstanbul straße STRASSE",
            "don't won't I'LL we've they'RE it's O'Neil ’tis",
            "numbers 1234567 3.14159 1e-9 0xdeadbeef 10/12/2026 ٣٤٥",
            "path/to/file.rs?x=1&y=2#frag https://example.invalid/a//b",
            "{\"json\": [1, 2, {\"k\": \"v\\n\"}], \"e\": null}",
            "    indented code\n\tif x { return y; }\n",
            "\u{feff}bom and \u{200b}zero width\u{200d}joiner",
            "ꦲꦏ꧀ꦱꦫ ᠮᠣᠩᠭᠣᠯ ߒߞߏ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟙𝟚𝟛",
        ];
        for t in both_encodings() {
            for s in samples {
                assert_eq!(t.count(s), reference(&t, s), "{s:?}");
            }
        }
    }

    #[test]
    fn counts_equal_tiktoken_on_random_text() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        // All-ASCII text takes the o200k counter's own splitter: its edges, densely. Then
        // characters that sit on the split pattern's edges in any script: cases, marks,
        // digits of several scripts, apostrophes, every kind of whitespace, slashes.
        let alphabets = [
            (
                "aAzZ09 \t\n\r\u{b}\u{c}'sStTrReEvVmMlLdD/.,!-_\u{0}\u{7f}",
                5000,
                40,
            ),
            (
                "aZeé ßx中ｱ😀09٣  \t\n\r\u{a0}\u{3000}\u{85}'’stdlmvr/.!-_,\u{301}İǅʰ\"{}",
                3000,
                48,
            ),
        ];
        for (alphabet, strings, longest) in alphabets {
            let alphabet: Vec<char> = alphabet.chars().collect();
            for t in both_encodings() {
                for _ in 0..strings {
                    let len = next() % longest;
                    let s: String = (0..len)
                        .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                        .collect();
                    assert_eq!(t.count(&s), reference(&t, &s), "{s:?}");
                }
            }
        }
    }

    #[test]
    fn a_recent_piece_is_found_only_by_its_own_bytes() {
        let mut r = Recent::new();
        r.put(7, b"hello", 1);
        assert_eq!(r.get(7, b"hello"), Some(1));
        // Same slot, other bytes or another length: not found, never another piece's count.
        assert_eq!(r.get(7, b"hellp"), None);
        assert_eq!(r.get(7, b"hell"), None);
        r.put(7, b" world", 2);
        assert_eq!(r.get(7, b"hello"), None);
        assert_eq!(r.get(7, b" world"), Some(2));
        // Longer than a slot holds: not kept.
        let long = [b'a'; RECENT_LEN + 1];
        r.put(9, &long, 3);
        assert_eq!(r.get(9, &long), None);
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
