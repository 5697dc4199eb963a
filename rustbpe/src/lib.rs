//! rustbpe: byte-level BPE training that is fast (rayon, GIL released) and memory-bounded
//! (the Python iterator is streamed in buffers; memory grows with the number of *distinct*
//! split chunks, not with the corpus).
//!
//! Vocabulary: ids 0..=255 are the single bytes, merge `i` creates id `256 + i`.
//! Training counts adjacent pairs inside each split chunk, weighted by the chunk's frequency,
//! and merges the most frequent pair; ties go to the pair that is smallest as `(left, right)`.
//! A pair whose concatenated bytes already exist as a token is never merged: it would create a
//! second id with the same bytes, which no rank-based encoder (tiktoken) can represent.
//!
//! Encoding uses tiktoken's algorithm (repeatedly merge the adjacent pair whose concatenation
//! has the lowest rank), so `encode` here and a tiktoken `Encoding` built from
//! `get_mergeable_ranks()` produce identical ids.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use ahash::{AHashMap, AHashSet};
use fancy_regex::Regex;
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use rayon::prelude::*;

/// GPT-4's split pattern (cl100k) with digits in groups of up to three (`\p{N}{1,3}`):
/// contractions, letter runs with one optional leading non-letter, 1-3 digit groups,
/// punctuation runs, newline runs, and whitespace (trailing space kept off the next word).
pub const GPT4_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

type Pair = (u32, u32);

/// A heap entry; `count` may be stale (higher than the true count) and is re-checked on pop.
#[derive(PartialEq, Eq)]
struct MergeJob {
    count: i64,
    pair: Pair,
}

impl Ord for MergeJob {
    fn cmp(&self, other: &Self) -> Ordering {
        // Max-heap on count; on equal counts the smaller pair must pop first.
        self.count
            .cmp(&other.count)
            .then_with(|| other.pair.cmp(&self.pair))
    }
}

impl PartialOrd for MergeJob {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

fn compile(pattern: &str) -> PyResult<Regex> {
    Regex::new(pattern)
        .map_err(|e| PyValueError::new_err(format!("invalid split pattern {pattern:?}: {e}")))
}

/// Split every text with `re` and count the chunks (parallel over texts).
fn count_chunks<'a>(re: &Regex, texts: &'a [String]) -> Result<AHashMap<&'a str, i64>, String> {
    texts
        .par_iter()
        .try_fold(AHashMap::new, |mut counts, text| {
            for m in re.find_iter(text) {
                let m = m.map_err(|e| format!("split pattern failed on a text: {e}"))?;
                *counts.entry(m.as_str()).or_insert(0) += 1;
            }
            Ok(counts)
        })
        .try_reduce(AHashMap::new, |mut a, b| {
            let (mut big, small) = if a.len() >= b.len() { (a, b) } else { (b, std::mem::take(&mut a)) };
            for (k, v) in small {
                *big.entry(k).or_insert(0) += v;
            }
            Ok(big)
        })
}

/// Adjacent-pair counts and the words each pair occurs in (parallel over words).
fn initial_pairs(
    words: &[Vec<u32>],
    counts: &[i64],
) -> (AHashMap<Pair, i64>, AHashMap<Pair, AHashSet<u32>>) {
    words
        .par_iter()
        .enumerate()
        .fold(
            || (AHashMap::new(), AHashMap::new()),
            |(mut pc, mut pos): (AHashMap<Pair, i64>, AHashMap<Pair, AHashSet<u32>>), (i, w)| {
                for p in w.windows(2) {
                    let pair = (p[0], p[1]);
                    *pc.entry(pair).or_insert(0) += counts[i];
                    pos.entry(pair).or_insert_with(AHashSet::new).insert(i as u32);
                }
                (pc, pos)
            },
        )
        .reduce(
            || (AHashMap::new(), AHashMap::new()),
            |(mut pc, mut pos), (pc2, pos2)| {
                for (k, v) in pc2 {
                    *pc.entry(k).or_insert(0) += v;
                }
                for (k, v) in pos2 {
                    pos.entry(k).or_insert_with(AHashSet::new).extend(v);
                }
                (pc, pos)
            },
        )
}

/// Replace every non-overlapping occurrence of `pair` (left to right) by `new_id`.
fn merge_word(word: &[u32], pair: Pair, new_id: u32) -> Vec<u32> {
    let mut out = Vec::with_capacity(word.len());
    let mut i = 0;
    while i < word.len() {
        if i + 1 < word.len() && word[i] == pair.0 && word[i + 1] == pair.1 {
            out.push(new_id);
            i += 2;
        } else {
            out.push(word[i]);
            i += 1;
        }
    }
    out
}

/// Learn up to `num_merges` merges from chunk frequencies. Returns the merged pairs in order.
fn learn_merges(chunks: AHashMap<String, i64>, num_merges: usize) -> Vec<Pair> {
    let (mut words, counts): (Vec<Vec<u32>>, Vec<i64>) = chunks
        .into_iter()
        .map(|(s, c)| (s.bytes().map(u32::from).collect(), c))
        .unzip();
    let (mut pair_counts, mut where_) = initial_pairs(&words, &counts);

    let mut heap: BinaryHeap<MergeJob> = pair_counts
        .iter()
        .filter(|(_, &c)| c > 0)
        .map(|(&pair, &count)| MergeJob { count, pair })
        .collect();
    let mut token_bytes: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    let mut known: AHashSet<Vec<u8>> = token_bytes.iter().cloned().collect();
    let mut merges = Vec::with_capacity(num_merges);
    let mut delta: AHashMap<Pair, i64> = AHashMap::new();

    while merges.len() < num_merges {
        let Some(job) = heap.pop() else { break };
        let current = pair_counts.get(&job.pair).copied().unwrap_or(0);
        if current != job.count {
            if current > 0 {
                heap.push(MergeJob { count: current, pair: job.pair });
            }
            continue;
        }
        if current <= 0 {
            continue;
        }
        let (a, b) = job.pair;
        let mut bytes = token_bytes[a as usize].clone();
        bytes.extend_from_slice(&token_bytes[b as usize]);
        if known.contains(&bytes) {
            continue; // banned for good: the token set only grows
        }
        let new_id = 256 + merges.len() as u32;
        merges.push(job.pair);
        known.insert(bytes.clone());
        token_bytes.push(bytes);

        let mut new_pairs: AHashSet<Pair> = AHashSet::new();
        for wi in where_.remove(&job.pair).unwrap_or_default() {
            let word = &words[wi as usize];
            let merged = merge_word(word, job.pair, new_id);
            if merged.len() == word.len() {
                continue; // stale position: the pair left this word in an earlier merge
            }
            // Pair-count change of this word = pairs after - pairs before (words are short).
            delta.clear();
            for p in word.windows(2) {
                *delta.entry((p[0], p[1])).or_insert(0) -= 1;
            }
            for p in merged.windows(2) {
                *delta.entry((p[0], p[1])).or_insert(0) += 1;
            }
            let c = counts[wi as usize];
            for (&pair, &d) in delta.iter() {
                if d == 0 {
                    continue;
                }
                *pair_counts.entry(pair).or_insert(0) += d * c;
                if d > 0 {
                    // Only pairs containing `new_id` can grow, and they are all new.
                    where_.entry(pair).or_insert_with(AHashSet::new).insert(wi);
                    new_pairs.insert(pair);
                }
            }
            words[wi as usize] = merged;
        }
        pair_counts.remove(&job.pair);
        for pair in new_pairs {
            let count = pair_counts[&pair];
            if count > 0 {
                heap.push(MergeJob { count, pair });
            }
        }
    }
    merges
}

/// tiktoken's byte-pair encoding of one chunk: merge the lowest-ranked adjacent pair first.
fn byte_pair_encode(piece: &[u8], ranks: &AHashMap<Vec<u8>, u32>, out: &mut Vec<u32>) {
    if let Some(&id) = ranks.get(piece) {
        out.push(id);
        return;
    }
    const NONE: u32 = u32::MAX;
    let rank_of = |s: &[u8]| ranks.get(s).copied().unwrap_or(NONE);
    // parts[i] = (start offset, rank of merging part i with part i + 1)
    let mut parts: Vec<(usize, u32)> = (0..piece.len())
        .map(|i| (i, if i + 1 < piece.len() { rank_of(&piece[i..i + 2]) } else { NONE }))
        .collect();
    parts.push((piece.len(), NONE));
    loop {
        let mut best = (NONE, 0usize);
        for (i, &(_, r)) in parts[..parts.len() - 1].iter().enumerate() {
            if r < best.0 {
                best = (r, i);
            }
        }
        if best.0 == NONE {
            break;
        }
        let i = best.1;
        parts.remove(i + 1);
        let span = |j: usize, parts: &Vec<(usize, u32)>| {
            if j + 2 < parts.len() {
                rank_of(&piece[parts[j].0..parts[j + 2].0])
            } else {
                NONE
            }
        };
        parts[i].1 = span(i, &parts);
        if i > 0 {
            parts[i - 1].1 = span(i - 1, &parts);
        }
    }
    for w in parts.windows(2) {
        out.push(ranks[&piece[w[0].0..w[1].0]]);
    }
}

/// A byte-level BPE tokenizer: train it, then read its ranks or encode/decode with it.
#[pyclass]
pub struct Tokenizer {
    pattern: String,
    regex: Regex,
    merges: Vec<Pair>,
    /// bytes of every id (index = id)
    vocab: Vec<Vec<u8>>,
    ranks: AHashMap<Vec<u8>, u32>,
}

impl Tokenizer {
    fn encode_one(&self, text: &str) -> Result<Vec<u32>, String> {
        let mut ids = Vec::with_capacity(text.len() / 3);
        for m in self.regex.find_iter(text) {
            let m = m.map_err(|e| format!("split pattern failed: {e}"))?;
            byte_pair_encode(m.as_str().as_bytes(), &self.ranks, &mut ids);
        }
        Ok(ids)
    }

    fn set_merges(&mut self, merges: Vec<Pair>) {
        let mut vocab: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        for &(a, b) in &merges {
            let mut bytes = vocab[a as usize].clone();
            bytes.extend_from_slice(&vocab[b as usize]);
            vocab.push(bytes);
        }
        self.ranks = vocab.iter().enumerate().map(|(i, b)| (b.clone(), i as u32)).collect();
        self.vocab = vocab;
        self.merges = merges;
    }
}

#[pymethods]
impl Tokenizer {
    #[new]
    fn new() -> PyResult<Self> {
        let mut tok = Tokenizer {
            pattern: GPT4_PATTERN.to_string(),
            regex: compile(GPT4_PATTERN)?,
            merges: Vec::new(),
            vocab: Vec::new(),
            ranks: AHashMap::new(),
        };
        tok.set_merges(Vec::new());
        Ok(tok)
    }

    /// Train on an iterator of str. `vocab_size` = 256 + number of merges. Streams the iterator
    /// `buffer_size` texts at a time; splitting/counting runs in parallel without the GIL.
    #[args(buffer_size = "8192", pattern = "None")]
    #[pyo3(text_signature = "($self, iterator, vocab_size, buffer_size=8192, pattern=None)")]
    fn train_from_iterator(
        &mut self,
        py: Python<'_>,
        iterator: &PyAny,
        vocab_size: usize,
        buffer_size: usize,
        pattern: Option<String>,
    ) -> PyResult<()> {
        if vocab_size < 256 {
            return Err(PyValueError::new_err(format!(
                "vocab_size={vocab_size} is below 256 (the byte tokens); pass 256 + the number of merges"
            )));
        }
        if buffer_size == 0 {
            return Err(PyValueError::new_err("buffer_size must be at least 1"));
        }
        let pattern = pattern.unwrap_or_else(|| GPT4_PATTERN.to_string());
        let regex = compile(&pattern)?;
        let mut chunks: AHashMap<String, i64> = AHashMap::new();
        let mut it = iterator.iter()?;
        let mut buffer: Vec<String> = Vec::with_capacity(buffer_size);
        loop {
            buffer.clear();
            for item in it.by_ref().take(buffer_size) {
                let item = item?;
                let text: String = item.extract().map_err(|_| {
                    PyTypeError::new_err(format!(
                        "train_from_iterator expects str items, got {}",
                        item.get_type().name().unwrap_or("?")
                    ))
                })?;
                buffer.push(text);
            }
            if buffer.is_empty() {
                break;
            }
            let local = py
                .allow_threads(|| count_chunks(&regex, &buffer))
                .map_err(PyRuntimeError::new_err)?;
            for (k, v) in local {
                match chunks.get_mut(k) {
                    Some(c) => *c += v,
                    None => {
                        chunks.insert(k.to_string(), v);
                    }
                }
            }
        }
        if chunks.is_empty() {
            return Err(PyValueError::new_err("the training iterator yielded no text"));
        }
        let merges = py.allow_threads(|| learn_merges(chunks, vocab_size - 256));
        self.pattern = pattern;
        self.regex = regex;
        self.set_merges(merges);
        Ok(())
    }

    /// The split pattern (regex) used for training and encoding.
    fn get_pattern(&self) -> String {
        self.pattern.clone()
    }

    /// `[(token_bytes, id), ...]` for every id, in id order (tiktoken's mergeable_ranks).
    fn get_mergeable_ranks(&self, py: Python<'_>) -> Vec<(PyObject, u32)> {
        self.vocab
            .iter()
            .enumerate()
            .map(|(i, b)| (PyBytes::new(py, b).into(), i as u32))
            .collect()
    }

    /// Number of ids (256 + merges learned).
    #[getter]
    fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    fn encode(&self, py: Python<'_>, text: &str) -> PyResult<Vec<u32>> {
        py.allow_threads(|| self.encode_one(text)).map_err(PyRuntimeError::new_err)
    }

    /// Encode many texts in parallel (GIL released).
    fn batch_encode(&self, py: Python<'_>, texts: Vec<String>) -> PyResult<Vec<Vec<u32>>> {
        py.allow_threads(|| texts.par_iter().map(|t| self.encode_one(t)).collect::<Result<Vec<_>, _>>())
            .map_err(PyRuntimeError::new_err)
    }

    /// Ids to text; invalid UTF-8 is replaced with U+FFFD (like tiktoken's decode).
    fn decode(&self, ids: Vec<u32>) -> PyResult<String> {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for id in ids {
            let tok = self.vocab.get(id as usize).ok_or_else(|| {
                PyValueError::new_err(format!("token id {id} out of range (vocab_size {})", self.vocab.len()))
            })?;
            bytes.extend_from_slice(tok);
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}

#[pymodule]
fn rustbpe(_py: Python<'_>, m: &PyModule) -> PyResult<()> {
    m.add_class::<Tokenizer>()?;
    m.add("GPT4_PATTERN", GPT4_PATTERN)?;
    Ok(())
}
