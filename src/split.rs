//! Splitting a long text into token-bounded chunks, for stages that run once per chunk
//! (`for_each = "chunk"`).
//!
//! This module owns the cut and nothing else: where a text is split, how pieces are packed
//! into chunks, and what each chunk repeats of the one before it (the overlap). It knows
//! tokens only through `cost::tokens::Tokenizer`, so a chunk's size is measured the way its
//! request will be billed.
//!
//! The rules, in order of importance:
//! - **Deterministic**: the same text, spec and tokenizer give the same chunks, byte for
//!   byte (chunk texts are hashed into request keys).
//! - **Bounded**: every chunk counts at most `max_tokens` (see [`split`] for the one
//!   exception, a single character worth more tokens than the whole budget).
//! - **Stable under local edits**: chunks are packed greedily from the start of the text with
//!   boundaries at paragraphs, and sizes are sums of per-paragraph counts. An edit inside one
//!   paragraph that keeps that paragraph's token count leaves every other paragraph's
//!   placement unchanged, so only the chunk holding it changes (and, with an overlap, the
//!   next chunk too when the edit lies in the tail that chunk repeats).
//! - **Natural boundaries**: cuts fall between paragraphs (blank lines) where possible, else
//!   after sentence ends (`.`, `!`, `?` followed by whitespace, or a line break), else at
//!   whitespace; a single word longer than the budget is cut between characters.

use std::ops::Range;

use crate::cost::tokens::Tokenizer;

/// How a stage cuts a text into chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SplitSpec {
    /// The most tokens a chunk may count, overlap included. 0 behaves as 1.
    pub max_tokens: u32,
    /// About how many tokens of the previous chunk's end each chunk repeats at its start
    /// (never more). Validation refuses `overlap_tokens >= max_tokens`; should it get here
    /// anyway it is clamped to `max_tokens / 2`.
    pub overlap_tokens: u32,
}

/// What separates packed paragraphs, and an overlap from the chunk's own text.
const PARAGRAPH_BREAK: &str = "\n\n";

/// A hard cut of an over-long word looks at most this many bytes per token of budget ahead,
/// so cutting a huge word costs time in proportion to its length, not its square.
const HARD_CUT_BYTES_PER_TOKEN: usize = 32;

/// The chunks of `text`: what the template sees as `chunk.text`, in order.
///
/// - Empty or whitespace-only text gives no chunk (the caller quarantines the record).
/// - A text of at most `max_tokens` gives one chunk: the text with its surrounding
///   whitespace trimmed, otherwise as is.
/// - A longer text is cut into paragraphs (runs of lines separated by blank lines, each
///   trimmed). Chunks take whole paragraphs, joined by exactly `"\n\n"`, while their summed
///   counts fit. A paragraph too long for a chunk on its own starts a new chunk and is cut
///   after sentence ends, a sentence too long is cut at whitespace, and a word too long is
///   cut between characters (never inside one); pieces of one paragraph keep the whitespace
///   that separated them. The chunk's end is checked with one real count; in the rare case
///   where joining text made it count more than the sum said, its last piece moves on to
///   the next chunk.
/// - With an overlap, each chunk after the first begins with the tail of the previous
///   chunk's text — cut where a sentence starts, or where a word starts when whole sentences
///   would give less than half the overlap, and never more than `overlap_tokens` — then
///   `"\n\n"`, then its own text. The overlap and its break count towards `max_tokens`: a
///   chunk's own text gets `max_tokens - overlap_tokens - count("\n\n")`. The overlap is
///   clamped so that this is at least one token. A chunk whose previous chunk is no longer
///   than the overlap repeats it whole.
///
/// Every chunk counts at most `max_tokens`, except a chunk that is a single character worth
/// more tokens than that (only possible with a budget of a few tokens): a chunk always
/// holds at least one character, so splitting always ends.
///
/// An edit that keeps its paragraph's token count changes only the chunk that holds the
/// paragraph; with an overlap, the next chunk changes too if the edit lies in the tail the
/// next chunk repeats. An edit that makes its paragraph grow or shrink does the same as long
/// as that chunk's paragraphs still fit it and the next paragraph still does not; otherwise
/// the boundaries of the chunks after it may move.
pub fn split(text: &str, spec: SplitSpec, tok: &Tokenizer) -> Vec<String> {
    split_chunks(text, spec, tok)
        .into_iter()
        .map(|c| c.text)
        .collect()
}

/// One chunk, with where its own text starts (after the overlap and its break).
#[derive(Debug)]
struct Chunk {
    text: String,
    #[cfg_attr(
        not(test),
        expect(dead_code, reason = "the tests check overlaps with it")
    )]
    own_start: usize,
}

/// The token budgets a spec works out to.
#[derive(Clone, Copy, Debug)]
struct Budget {
    /// The most a whole chunk may count.
    max: u64,
    /// The most its overlap may count (0: no overlap).
    overlap: u64,
    /// The most its own text may count.
    own: u64,
}

impl Budget {
    fn new(spec: SplitSpec, break_tokens: u64) -> Self {
        let max = u64::from(spec.max_tokens.max(1));
        let mut overlap = u64::from(spec.overlap_tokens);
        if overlap >= max {
            overlap = max / 2;
        }
        // Leave the own text at least one token after the overlap and its break.
        overlap = overlap.min(max.saturating_sub(break_tokens + 1));
        let own = if overlap == 0 {
            max
        } else {
            max - overlap - break_tokens
        };
        Budget { max, overlap, own }
    }
}

/// A piece of the source to pack: a paragraph, or a part of one too long to fit a chunk.
#[derive(Clone, Debug)]
struct Seg {
    /// The source whitespace before the piece inside its paragraph (empty for a paragraph's
    /// first piece and for the continuation of a hard-cut word).
    sep: Range<usize>,
    text: Range<usize>,
    /// Starts a paragraph: joined to the piece before it by `PARAGRAPH_BREAK`.
    para_start: bool,
    /// Starts a chunk: the first piece of a paragraph that fits no chunk whole.
    break_before: bool,
    /// The piece's own count.
    tokens: u64,
    /// What the piece adds after another piece of the same chunk, separator included.
    joined: u64,
}

fn split_chunks(text: &str, spec: SplitSpec, tok: &Tokenizer) -> Vec<Chunk> {
    let src = text.trim();
    if src.is_empty() {
        return Vec::new();
    }
    let break_tokens = tok.count(PARAGRAPH_BREAK);
    let budget = Budget::new(spec, break_tokens);
    if tok.count(src) <= budget.max {
        return vec![Chunk {
            text: src.to_string(),
            own_start: 0,
        }];
    }
    let segs = segments(src, budget.own, break_tokens, tok);
    pack(src, &segs, budget, tok)
}

/// The source cut into pieces that each fit `budget`, in order. Each paragraph is counted
/// once; only a paragraph that does not fit is counted again by sentences, and only a
/// sentence that does not fit by words.
fn segments(src: &str, budget: u64, break_tokens: u64, tok: &Tokenizer) -> Vec<Seg> {
    let mut segs = Vec::new();
    let piece = |sep: Range<usize>, text: Range<usize>, tokens: u64| Seg {
        joined: if sep.is_empty() {
            tokens
        } else {
            tok.count(&src[sep.start..text.end])
        },
        sep,
        text,
        para_start: false,
        break_before: false,
        tokens,
    };
    for para in paragraphs(src) {
        let tokens = tok.count(&src[para.clone()]);
        if tokens <= budget {
            segs.push(Seg {
                sep: para.start..para.start,
                text: para,
                para_start: true,
                break_before: false,
                tokens,
                joined: tokens + break_tokens,
            });
            continue;
        }
        let first = segs.len();
        for (sep, sentence) in pieces(src, para, true) {
            let tokens = tok.count(&src[sentence.clone()]);
            if tokens <= budget {
                segs.push(piece(sep, sentence, tokens));
                continue;
            }
            for (k, (word_sep, word)) in pieces(src, sentence, false).into_iter().enumerate() {
                let word_sep = if k == 0 { sep.clone() } else { word_sep };
                let tokens = tok.count(&src[word.clone()]);
                if tokens <= budget {
                    segs.push(piece(word_sep, word, tokens));
                    continue;
                }
                for (k, (cut, tokens)) in hard_cut(src, word, budget, tok).into_iter().enumerate() {
                    let cut_sep = if k == 0 {
                        word_sep.clone()
                    } else {
                        cut.start..cut.start
                    };
                    segs.push(piece(cut_sep, cut, tokens));
                }
            }
        }
        segs[first].para_start = true;
        segs[first].break_before = true;
    }
    segs
}

/// Packs pieces greedily into chunks of at most `budget.own` tokens (by summed counts),
/// each after the tail of the chunk before it.
fn pack(src: &str, segs: &[Seg], budget: Budget, tok: &Tokenizer) -> Vec<Chunk> {
    let mut chunks: Vec<Chunk> = Vec::new();
    let mut i = 0;
    while i < segs.len() {
        let start = i;
        let mut sum = segs[i].tokens;
        i += 1;
        while i < segs.len() && !segs[i].break_before && sum + segs[i].joined <= budget.own {
            sum += segs[i].joined;
            i += 1;
        }
        let mut overlap = chunks
            .last()
            .map_or("", |c| tail(&c.text, budget.overlap, tok))
            .to_string();
        // The sums bound the real count in practice; one real count per chunk makes sure.
        loop {
            let own = join(src, &segs[start..i]);
            let chunk = if overlap.is_empty() {
                Chunk {
                    text: own,
                    own_start: 0,
                }
            } else {
                Chunk {
                    own_start: overlap.len() + PARAGRAPH_BREAK.len(),
                    text: format!("{overlap}{PARAGRAPH_BREAK}{own}"),
                }
            };
            let single = i - start == 1;
            if (single && overlap.is_empty()) || tok.count(&chunk.text) <= budget.max {
                chunks.push(chunk);
                break;
            }
            if single {
                overlap.clear();
            } else {
                i -= 1;
            }
        }
    }
    chunks
}

/// The pieces' text: paragraphs joined by `PARAGRAPH_BREAK`, parts of one paragraph by the
/// whitespace that separated them.
fn join(src: &str, segs: &[Seg]) -> String {
    let len = segs.iter().map(|s| s.text.len() + 2).sum();
    let mut out = String::with_capacity(len);
    for (k, seg) in segs.iter().enumerate() {
        if k > 0 {
            out.push_str(if seg.para_start {
                PARAGRAPH_BREAK
            } else {
                &src[seg.sep.clone()]
            });
        }
        out.push_str(&src[seg.text.clone()]);
    }
    out
}

/// The end of `text` to repeat at the start of the next chunk: the longest tail starting
/// where a sentence starts that counts at most `overlap`, or, when that counts less than
/// half of `overlap`, the longest such tail starting where a word starts. May be empty.
fn tail<'t>(text: &'t str, overlap: u64, tok: &Tokenizer) -> &'t str {
    if overlap == 0 {
        return "";
    }
    let longest = |sentences: bool| -> &'t str {
        let starts: Vec<usize> = pieces(text, 0..text.len(), sentences)
            .into_iter()
            .map(|(_, piece)| piece.start)
            .collect();
        // Tails shrink as their start moves right, so a binary search finds the first that
        // fits; the walk after it only matters if a count were ever not monotonic.
        let first = starts.partition_point(|&s| tok.count(&text[s..]) > overlap);
        starts[first..]
            .iter()
            .map(|&s| &text[s..])
            .find(|t| tok.count(t) <= overlap)
            .unwrap_or("")
    };
    let by_sentence = longest(true);
    if tok.count(by_sentence) * 2 >= overlap {
        by_sentence
    } else {
        longest(false)
    }
}

/// The paragraphs of `src`: maximal runs of non-blank lines (a blank line holds only
/// whitespace), each trimmed, as byte ranges.
fn paragraphs(src: &str) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut start = None;
    let mut end = 0;
    let mut pos = 0;
    for line in src.split_inclusive('\n') {
        if line.trim().is_empty() {
            if let Some(s) = start.take() {
                out.push(s..end);
            }
        } else {
            let lead = line.len() - line.trim_start().len();
            start.get_or_insert(pos + lead);
            end = pos + line.trim_end().len();
        }
        pos += line.len();
    }
    if let Some(s) = start {
        out.push(s..end);
    }
    out
}

/// `range` of `src` (trimmed) cut at whitespace runs: at every run, or with `sentences` only
/// at runs after `.`, `!` or `?` and runs holding a line break. Each piece comes with the
/// whitespace before it (empty for the first).
fn pieces(src: &str, range: Range<usize>, sentences: bool) -> Vec<(Range<usize>, Range<usize>)> {
    let base = range.start;
    let s = &src[range];
    let mut out = Vec::new();
    let mut sep = base..base;
    let mut piece_start = 0;
    let mut prev = None;
    let mut chars = s.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if !c.is_whitespace() {
            prev = Some(c);
            continue;
        }
        let mut end = i + c.len_utf8();
        let mut line_break = c == '\n';
        while let Some(&(j, d)) = chars.peek() {
            if !d.is_whitespace() {
                break;
            }
            line_break |= d == '\n';
            end = j + d.len_utf8();
            chars.next();
        }
        if !sentences || line_break || matches!(prev, Some('.' | '!' | '?')) {
            out.push((sep, base + piece_start..base + i));
            sep = base + i..base + end;
            piece_start = end;
        }
    }
    if piece_start < s.len() {
        out.push((sep, base + piece_start..base + s.len()));
    }
    out
}

/// A word too long for `budget` cut between characters into pieces that each count at most
/// `budget` (or are one character), with their counts.
fn hard_cut(
    src: &str,
    word: Range<usize>,
    budget: u64,
    tok: &Tokenizer,
) -> Vec<(Range<usize>, u64)> {
    let window_bytes = usize::try_from(budget)
        .unwrap_or(usize::MAX)
        .saturating_mul(HARD_CUT_BYTES_PER_TOKEN);
    let mut out = Vec::new();
    let mut start = word.start;
    while start < word.end {
        let rest = &src[start..word.end];
        let window = &rest[..floor_char_boundary(rest, window_bytes)];
        let cut = tok.truncate(window, budget);
        let mut len = if window.starts_with(cut.as_str()) {
            cut.len()
        } else {
            0
        };
        let mut tokens = tok.count(&rest[..len]);
        while len > 0 && tokens > budget {
            len = floor_char_boundary(rest, len - 1);
            tokens = tok.count(&rest[..len]);
        }
        if len == 0 {
            len = rest.chars().next().map_or(rest.len(), char::len_utf8);
            tokens = tok.count(&rest[..len]);
        }
        out.push((start..start + len, tokens));
        start += len;
    }
    out
}

/// The largest char boundary of `s` at or below `at`.
fn floor_char_boundary(s: &str, at: usize) -> usize {
    let mut at = at.min(s.len());
    while !s.is_char_boundary(at) {
        at -= 1;
    }
    at
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exact() -> Tokenizer {
        Tokenizer::for_model("gpt-5.4-mini")
    }

    fn spec(max_tokens: u32, overlap_tokens: u32) -> SplitSpec {
        SplitSpec {
            max_tokens,
            overlap_tokens,
        }
    }

    const VOCAB: &[&str] = &[
        "account",
        "billing",
        "refund",
        "invoice",
        "customer",
        "order",
        "shipping",
        "warehouse",
        "policy",
        "request",
        "support",
        "agent",
        "payment",
        "card",
        "subscription",
        "renewal",
        "period",
        "notice",
        "data",
        "retention",
        "security",
        "review",
        "access",
        "team",
        "plan",
        "upgrade",
        "report",
        "export",
        "device",
        "return",
        "label",
        "carrier",
        "window",
        "days",
        "the",
        "a",
        "of",
        "to",
        "and",
        "in",
        "for",
        "with",
        "on",
        "is",
        "are",
        "may",
        "will",
        "can",
        "within",
        "after",
        "before",
        "every",
        "each",
        "our",
        "your",
    ];

    /// A deterministic pseudo-random generator (an LCG), so test texts need no fixtures.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 33) % n as u64) as usize
        }
    }

    fn sentence(rng: &mut Rng, words: usize) -> String {
        let mut s = String::new();
        for k in 0..words {
            let w = VOCAB[rng.below(VOCAB.len())];
            if k == 0 {
                s.push_str(&w[..1].to_uppercase());
                s.push_str(&w[1..]);
            } else {
                s.push(' ');
                s.push_str(w);
            }
        }
        s.push('.');
        s
    }

    fn paragraph(rng: &mut Rng, sentences: usize) -> String {
        (0..sentences)
            .map(|_| {
                let n = 8 + rng.below(12);
                sentence(rng, n)
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// `n` paragraphs of 3 to 5 sentences (30 to 100 tokens each with o200k).
    fn paragraphs_for(seed: u64, n: usize) -> Vec<String> {
        let mut rng = Rng(seed);
        (0..n)
            .map(|_| {
                let s = 3 + rng.below(3);
                paragraph(&mut rng, s)
            })
            .collect()
    }

    fn non_ws(s: &str) -> String {
        s.chars().filter(|c| !c.is_whitespace()).collect()
    }

    /// The chunks differing between two splits of the same length.
    fn differing(a: &[String], b: &[String]) -> Vec<usize> {
        assert_eq!(a.len(), b.len(), "the edit moved chunk boundaries");
        (0..a.len()).filter(|&k| a[k] != b[k]).collect()
    }

    /// Replaces the `nth` word of paragraph `p` (or the nearest after, else before, it that
    /// has one) by a vocabulary word of the same token count and byte length, so both
    /// tokenizers count the paragraph the same. Returns the edited paragraphs and the byte
    /// offset of the edit in the paragraph.
    fn edit_word(paras: &[String], p: usize, nth: usize, tok: &Tokenizer) -> (Vec<String>, usize) {
        let words: Vec<&str> = paras[p].split(' ').collect();
        let same_size = |old: &str| {
            VOCAB.iter().copied().find(|w| {
                *w != old
                    && w.len() == old.len()
                    && tok.count(&format!(" {w}")) == tok.count(&format!(" {old}"))
            })
        };
        let (nth, old, new) = (nth..words.len())
            .chain((0..nth).rev())
            .find_map(|i| {
                let old = words[i].trim_end_matches('.');
                same_size(old).map(|new| (i, old, new))
            })
            .expect("a same-size replacement");
        let offset: usize = words[..nth].iter().map(|w| w.len() + 1).sum();
        let mut edited = paras.to_vec();
        edited[p] = format!(
            "{}{}{}",
            &paras[p][..offset],
            new,
            &paras[p][offset + old.len()..]
        );
        assert_eq!(tok.count(&edited[p]), tok.count(&paras[p]));
        assert_eq!(edited[p].len(), paras[p].len());
        (edited, offset)
    }

    #[test]
    fn empty_or_blank_text_gives_no_chunk() {
        for tok in [exact(), Tokenizer::estimator()] {
            assert!(split("", spec(100, 0), &tok).is_empty());
            assert!(split(" \n\n\t \r\n ", spec(100, 10), &tok).is_empty());
        }
    }

    #[test]
    fn a_short_text_is_one_trimmed_chunk_kept_as_is() {
        let text = "\n\n  First line.\n\n\n\nSecond   paragraph,  spaced oddly.\r\n \n";
        for tok in [exact(), Tokenizer::estimator()] {
            let chunks = split(text, spec(100, 20), &tok);
            assert_eq!(chunks, vec![text.trim().to_string()]);
        }
    }

    #[test]
    fn every_chunk_fits_max_tokens() {
        let paras = paragraphs_for(7, 40);
        let mut rng = Rng(99);
        // one paragraph far longer than any budget, and one endless sentence
        let long = paragraph(&mut rng, 60);
        let run_on = sentence(&mut rng, 900);
        let text = format!(
            "{}\n\n{long}\n\n{run_on}\n\n{}",
            paras[..20].join("\n\n"),
            paras[20..].join("\n\n")
        );
        for tok in [exact(), Tokenizer::estimator()] {
            for (max, overlap) in [(400, 0), (400, 50), (120, 30), (64, 63), (30, 0), (10, 3)] {
                let chunks = split(&text, spec(max, overlap), &tok);
                assert!(chunks.len() > 1);
                for c in &chunks {
                    assert!(
                        tok.count(c) <= u64::from(max),
                        "{max}/{overlap}: {} tokens in {c:?}",
                        tok.count(c)
                    );
                    assert_eq!(c.trim(), c);
                }
            }
        }
    }

    #[test]
    fn splitting_is_deterministic() {
        let text = paragraphs_for(3, 30).join("\n\n");
        let a = split(&text, spec(300, 40), &exact());
        let b = split(&text, spec(300, 40), &Tokenizer::for_model("gpt-5.4-mini"));
        assert_eq!(a, b);
        assert_eq!(a, split(&text, spec(300, 40), &exact()));
    }

    #[test]
    fn no_text_is_lost_or_added_outside_the_overlaps() {
        let mut rng = Rng(5);
        let long = paragraph(&mut rng, 50);
        let word = "x".repeat(5000);
        let text = format!(
            "{}\n\n \n{long}\n{word} tail.\n\n{}",
            paragraphs_for(1, 12).join("\n\n"),
            paragraphs_for(2, 12).join("\r\n\r\n")
        );
        for tok in [exact(), Tokenizer::estimator()] {
            for (max, overlap) in [(200, 0), (200, 60), (50, 10)] {
                let chunks = split_chunks(&text, spec(max, overlap), &tok);
                let own: String = chunks.iter().map(|c| &c.text[c.own_start..]).collect();
                assert_eq!(non_ws(&own), non_ws(&text));
                for w in chunks.windows(2) {
                    if w[1].own_start > 0 {
                        let overlap_text = &w[1].text[..w[1].own_start - 2];
                        assert!(w[0].text.ends_with(overlap_text));
                        assert!(tok.count(overlap_text) <= u64::from(overlap));
                        assert_eq!(&w[1].text[w[1].own_start - 2..w[1].own_start], "\n\n");
                    }
                }
            }
        }
    }

    #[test]
    fn whole_paragraphs_are_packed_greedily_with_one_blank_line_between() {
        let tok = exact();
        let paras = paragraphs_for(11, 20);
        let text = paras.join("\n\n\n");
        let chunks = split(&text, spec(400, 0), &tok);
        let break_tokens = tok.count("\n\n");
        let mut next = 0;
        for (k, chunk) in chunks.iter().enumerate() {
            let mut held = Vec::new();
            let mut rest = chunk.as_str();
            while !rest.is_empty() {
                let p = &paras[next];
                rest = rest
                    .strip_prefix(p.as_str())
                    .expect("whole paragraphs, in order");
                rest = rest.strip_prefix("\n\n").unwrap_or(rest);
                held.push(next);
                next += 1;
            }
            let sum: u64 = held
                .iter()
                .map(|&p| tok.count(&paras[p]) + break_tokens)
                .sum::<u64>()
                - break_tokens;
            assert!(sum <= 400);
            if k + 1 < chunks.len() {
                // greedy: the next paragraph would not have fitted
                assert!(sum + break_tokens + tok.count(&paras[next]) > 400);
            }
        }
        assert_eq!(next, paras.len());
    }

    #[test]
    fn a_long_paragraph_is_cut_at_sentences_then_words() {
        let tok = exact();
        let mut rng = Rng(21);
        let long = paragraph(&mut rng, 40);
        let chunks = split(&long, spec(100, 0), &tok);
        assert!(chunks.len() > 3);
        for c in &chunks {
            assert!(c.ends_with('.'), "not cut at a sentence end: {c:?}");
            assert!(c.starts_with(|ch: char| ch.is_uppercase()));
        }
        assert_eq!(chunks.join(" "), long);

        let run_on = sentence(&mut rng, 600);
        let chunks = split(&run_on, spec(100, 0), &tok);
        assert!(chunks.len() > 3);
        assert_eq!(chunks.join(" "), run_on);
        // packed: each chunk but the last left no room for the next word
        for w in chunks.windows(2) {
            let next_word = w[1].split(' ').next().unwrap();
            assert!(
                tok.count(&format!("{} {next_word}", w[0])) > 90,
                "{:?}",
                w[0]
            );
        }
    }

    #[test]
    fn a_paragraph_too_long_to_fit_starts_a_chunk() {
        let tok = exact();
        let mut rng = Rng(4);
        let short = paragraph(&mut rng, 1);
        let long = paragraph(&mut rng, 30);
        let text = format!("{short}\n\n{long}");
        let chunks = split(&text, spec(200, 0), &tok);
        assert_eq!(chunks[0], short);
        assert!(long.starts_with(&chunks[1]));
    }

    #[test]
    fn an_overlong_word_is_cut_between_characters() {
        let word: String = "é日本🦀a".repeat(700);
        let text = format!("Before it. {word} after it.");
        for tok in [exact(), Tokenizer::estimator()] {
            for max in [50, 7, 3] {
                let chunks = split(&text, spec(max, 0), &tok);
                for c in &chunks {
                    assert!(tok.count(c) <= u64::from(max), "{max}: {c:?}");
                }
                assert_eq!(non_ws(&chunks.concat()), non_ws(&text));
                if max == 50 {
                    let start: String = word.chars().take(12).collect();
                    assert!(chunks.iter().any(|c| c.contains(&start)));
                }
            }
            // a budget smaller than one character: one character per chunk, and it ends
            let chunks = split("🦀🦀🦀🦀", spec(1, 0), &tok);
            assert_eq!(chunks.concat(), "🦀🦀🦀🦀");
            assert!(chunks.iter().all(|c| c.chars().count() >= 1));
        }
    }

    #[test]
    fn tiny_or_contradictory_specs_end_and_keep_the_text() {
        let text = format!(
            "{}\n\nÀ la carte 🦀 done!",
            paragraphs_for(8, 6).join("\n\n")
        );
        for tok in [exact(), Tokenizer::estimator()] {
            for (max, overlap) in [
                (0, 0),
                (1, 0),
                (1, 1),
                (2, 1),
                (3, 2),
                (5, 5),
                (5, 100),
                (400, 399),
            ] {
                let chunks = split_chunks(&text, spec(max, overlap), &tok);
                let own: String = chunks.iter().map(|c| &c.text[c.own_start..]).collect();
                assert_eq!(non_ws(&own), non_ws(&text), "{max}/{overlap}");
                for c in &chunks {
                    let n = tok.count(&c.text);
                    assert!(
                        n <= u64::from(max.max(1)) || c.text.chars().count() == 1,
                        "{max}/{overlap}: {c:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn an_overlap_not_below_max_is_clamped_to_half() {
        let tok = exact();
        let text = paragraphs_for(9, 20).join("\n\n");
        let half = split(&text, spec(300, 150), &tok);
        assert_eq!(split(&text, spec(300, 300), &tok), half);
        assert_eq!(split(&text, spec(300, 5000), &tok), half);
        assert_ne!(split(&text, spec(300, 0), &tok), half);
    }

    #[test]
    fn each_chunk_begins_with_the_tail_of_the_previous_one() {
        let tok = exact();
        let text = paragraphs_for(12, 20).join("\n\n");
        let chunks = split_chunks(&text, spec(400, 60), &tok);
        assert!(chunks.len() > 3);
        assert_eq!(chunks[0].own_start, 0);
        for w in chunks.windows(2) {
            let overlap = &w[1].text[..w[1].own_start - 2];
            assert!(w[0].text.ends_with(overlap));
            let n = tok.count(overlap);
            // whole sentences, about the overlap: at least half of it here
            assert!((30..=60).contains(&n), "{n}: {overlap:?}");
            assert!(
                overlap.starts_with(|c: char| c.is_uppercase()),
                "{overlap:?}"
            );
        }
        // sentences longer than the overlap: cut at a word, still within it
        let mut rng = Rng(1);
        let text = (0..12)
            .map(|_| sentence(&mut rng, 60))
            .collect::<Vec<_>>()
            .join("\n\n");
        let chunks = split_chunks(&text, spec(200, 20), &tok);
        for w in chunks.windows(2) {
            let overlap = &w[1].text[..w[1].own_start - 2];
            assert!((10..=20).contains(&tok.count(overlap)), "{overlap:?}");
            assert!(w[0].text.ends_with(&format!(" {overlap}")));
        }
    }

    /// The stability tests' document: (its paragraphs, its chunks, and a chunk `k` with a
    /// chunk after it whose own text begins with paragraph `p` and holds `p + 1` too).
    fn stable_setup(tok: &Tokenizer, overlap: u32) -> (Vec<String>, Vec<Chunk>, usize, usize) {
        let paras = paragraphs_for(2024, 20);
        let chunks = split_chunks(&paras.join("\n\n"), spec(400, overlap), tok);
        assert!(chunks.len() >= 3, "{} chunks", chunks.len());
        let middle = chunks.len() / 2;
        let (k, p) = (middle..chunks.len() - 1)
            .chain((1..middle).rev())
            .find_map(|k| {
                let own = &chunks[k].text[chunks[k].own_start..];
                let p = paras.iter().position(|p| own.starts_with(p.as_str()))?;
                own.contains(&format!("{}\n\n{}", paras[p], paras[p + 1]))
                    .then_some((k, p))
            })
            .expect("a chunk holding two paragraphs");
        (paras, chunks, k, p)
    }

    /// Where chunk `k + 1`'s overlap starts in chunk `k` (its length if there is none).
    fn repeated_from(chunks: &[Chunk], k: usize) -> usize {
        let next = &chunks[k + 1];
        let overlap = next.own_start.saturating_sub(PARAGRAPH_BREAK.len());
        chunks[k].text.len() - overlap
    }

    fn texts(chunks: Vec<Chunk>) -> Vec<String> {
        chunks.into_iter().map(|c| c.text).collect()
    }

    #[test]
    fn a_same_size_edit_changes_only_the_chunk_holding_it() {
        for tok in [exact(), Tokenizer::estimator()] {
            for overlap in [0, 40] {
                let (paras, chunks, k, p) = stable_setup(&tok, overlap);
                let (edited, offset) = edit_word(&paras, p, 6, &tok);
                // the edit lies before the tail that chunk k + 1 repeats
                let at = chunks[k].own_start + offset;
                assert!(at < repeated_from(&chunks, k));
                let after = split(&edited.join("\n\n"), spec(400, overlap), &tok);
                assert_eq!(
                    differing(&texts(chunks), &after),
                    vec![k],
                    "overlap {overlap}"
                );
            }
        }
    }

    #[test]
    fn an_edit_in_the_repeated_tail_changes_the_next_chunk_too() {
        for tok in [exact(), Tokenizer::estimator()] {
            let (paras, chunks, k, _) = stable_setup(&tok, 40);
            // the next-to-last word of chunk k, which ends with a whole paragraph
            let last = paras
                .iter()
                .rposition(|p| chunks[k].text.ends_with(p.as_str()))
                .unwrap();
            let nth = paras[last].split(' ').count() - 2;
            let (edited, offset) = edit_word(&paras, last, nth, &tok);
            let at = chunks[k].text.len() - paras[last].len() + offset;
            assert!(
                at >= repeated_from(&chunks, k),
                "the edit is not in the overlap"
            );
            let after = split(&edited.join("\n\n"), spec(400, 40), &tok);
            assert_eq!(differing(&texts(chunks), &after), vec![k, k + 1]);
        }
    }

    #[test]
    fn a_long_text_splits_fast() {
        let tok = exact();
        let mut rng = Rng(77);
        let mut paras = paragraphs_for(50, 840);
        paras.insert(100, paragraph(&mut rng, 80));
        paras.insert(300, sentence(&mut rng, 2000));
        let text = paras.join("\n\n");
        let total = tok.count(&text);
        assert!(total >= 50_000, "{total}");
        let started = std::time::Instant::now();
        let chunks = split(&text, spec(500, 50), &tok);
        let took = started.elapsed();
        assert!(chunks.len() > 100);
        // well under a second even in a debug build; the bound leaves room for a busy machine
        assert!(
            took < std::time::Duration::from_secs(3),
            "{took:?} for {total} tokens"
        );
    }
}
