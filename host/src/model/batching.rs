//! The batching core that the CLI driver ([`super::driver`]) and the server's scheduler both
//! use: which sequences feed how many tokens in the next pass, which sequences make room when
//! the KV cache cannot hold that plan, which logit rows each entry gets, and what each row
//! is for when the tokens are emitted. Pure functions
//! over plain numbers, so that the golden batched and chunked-prefill tests exercise the same
//! planning the server runs.

use super::executor::LogitRows;
use super::kv_cache::BlockPool;

/// Limits of one forward pass.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Tokens in one pass: decode tokens plus prefill chunks.
    pub max_batch_tokens: usize,
    /// Most prompt tokens one sequence feeds in one pass.
    pub prefill_chunk: usize,
}

/// A running sequence as the planner sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeqView {
    /// Tokens known but not yet in the cache: the rest of the prompt, or the one token
    /// sampled last (a decode step).
    pub unfed: usize,
    /// Tokens in its cache.
    pub kv_len: usize,
    /// Blocks it holds.
    pub kv_blocks: usize,
}

/// A planned entry: (index of the sequence, tokens it feeds).
pub type Planned = (usize, usize);

/// The next pass: every decoding sequence (one unfed token) first, then prompt chunks in
/// order of arrival (at most `prefill_chunk` each), while `max_batch_tokens` lasts. Entries
/// come in sequence order.
pub fn plan(seqs: &[SeqView], limits: &Limits) -> Vec<Planned> {
    let mut budget = limits.max_batch_tokens.max(1);
    let mut planned = Vec::with_capacity(seqs.len());
    for (i, s) in seqs.iter().enumerate() {
        if s.unfed == 1 && budget > 0 {
            planned.push((i, 1));
            budget -= 1;
        }
    }
    for (i, s) in seqs.iter().enumerate() {
        if s.unfed > 1 && budget > 0 {
            let n = s.unfed.min(limits.prefill_chunk.max(1)).min(budget);
            planned.push((i, n));
            budget -= n;
        }
    }
    planned.sort_unstable_by_key(|&(i, _)| i);
    planned
}

/// Blocks the plan needs beyond those its sequences hold.
pub fn blocks_needed(seqs: &[SeqView], planned: &[Planned]) -> usize {
    planned
        .iter()
        .map(|&(i, n)| {
            let s = &seqs[i];
            BlockPool::blocks_for(s.kv_len + n).saturating_sub(s.kv_blocks)
        })
        .sum()
}

/// [`plan`] within `free_blocks`: while the cache cannot hold the plan and more than one
/// sequence is left, the newest sequence (the last) gives its blocks back and leaves the plan.
/// Returns the plan over the sequences that stay, and how many of the newest to preempt.
pub fn plan_within(seqs: &[SeqView], limits: &Limits, free_blocks: usize) -> (Vec<Planned>, usize) {
    let mut kept = seqs.len();
    let mut free = free_blocks;
    loop {
        let planned = plan(&seqs[..kept], limits);
        if blocks_needed(seqs, &planned) <= free || kept <= 1 {
            return (planned, seqs.len() - kept);
        }
        kept -= 1;
        free += seqs[kept].kv_blocks;
    }
}

/// The logit rows an entry needs: every row when its prompt's log-probabilities are wanted,
/// the last when this pass feeds its last known token (a sample follows; only its argmax
/// when `argmax_only`), else none (a prompt chunk short of the end).
pub fn logit_rows(
    fed: usize,
    n: usize,
    known: usize,
    all_rows: bool,
    argmax_only: bool,
) -> LogitRows {
    if all_rows {
        LogitRows::All
    } else if fed + n == known {
        if argmax_only {
            LogitRows::Argmax
        } else {
            LogitRows::Last
        }
    } else {
        LogitRows::None
    }
}

/// What one logit row of a pass is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowUse {
    /// The row of position `pos`: the log-probability of prompt token `pos + 1`.
    PromptLogprob(usize),
    /// The next token is sampled from it.
    Sample,
    /// Nothing (a row of a generated token fed again with every row asked for).
    Skip,
}

/// The use of each logit row an entry gets, in row order. The entry fed `n` tokens from
/// position `first`; its sequence knows `known` tokens, the first `prompt_len` of them its
/// prompt. With [`LogitRows::All`], the row of position `pos` gives the log-probability of
/// prompt token `pos + 1` while that is in the prompt, and the row of the last known token is
/// sampled; with [`LogitRows::Last`] the one row is sampled; [`LogitRows::None`] has no rows,
/// nor has [`LogitRows::Argmax`] (its choice comes as a token id instead).
pub fn row_uses(
    rows: LogitRows,
    first: usize,
    n: usize,
    prompt_len: usize,
    known: usize,
) -> impl Iterator<Item = RowUse> {
    let positions = match rows {
        LogitRows::None | LogitRows::Argmax => 0..0,
        LogitRows::Last => first + n - 1..first + n,
        LogitRows::All => first..first + n,
    };
    positions.map(move |pos| {
        if rows == LogitRows::All && pos + 1 < prompt_len {
            RowUse::PromptLogprob(pos)
        } else if pos + 1 == known {
            RowUse::Sample
        } else {
            RowUse::Skip
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(unfed: usize, kv_len: usize) -> SeqView {
        SeqView {
            unfed,
            kv_len,
            kv_blocks: BlockPool::blocks_for(kv_len),
        }
    }

    const WIDE: Limits = Limits {
        max_batch_tokens: 512,
        prefill_chunk: 256,
    };

    #[test]
    fn decodes_go_first_and_prompts_share_the_rest_of_the_budget() {
        // A 300-token prompt, two decoding sequences, a 50-token prompt; 100 tokens a pass.
        let seqs = [seq(300, 0), seq(1, 40), seq(1, 7), seq(50, 0)];
        let limits = Limits {
            max_batch_tokens: 100,
            prefill_chunk: 64,
        };
        assert_eq!(plan(&seqs, &limits), vec![(0, 64), (1, 1), (2, 1), (3, 34)]);
        // With a budget of 2 only the decodes run.
        let tight = Limits {
            max_batch_tokens: 2,
            ..limits
        };
        assert_eq!(plan(&seqs, &tight), vec![(1, 1), (2, 1)]);
    }

    #[test]
    fn a_zero_budget_still_moves_one_token() {
        let limits = Limits {
            max_batch_tokens: 0,
            prefill_chunk: 0,
        };
        assert_eq!(plan(&[seq(5, 0)], &limits), vec![(0, 1)]);
    }

    #[test]
    fn blocks_needed_counts_only_new_blocks() {
        // 15 tokens hold one block; one more fits, two more need a second block.
        let seqs = [seq(1, 15), seq(2, 15), seq(17, 0)];
        assert_eq!(blocks_needed(&seqs, &[(0, 1)]), 0);
        assert_eq!(blocks_needed(&seqs, &[(1, 2)]), 1);
        assert_eq!(blocks_needed(&seqs, &[(0, 1), (1, 2), (2, 17)]), 3);
    }

    #[test]
    fn the_newest_sequences_make_room_and_their_blocks_count() {
        // Three decoding sequences at block boundaries each need a new block; one is free.
        let seqs = [seq(1, 16), seq(1, 32), seq(1, 48)];
        let (planned, preempt) = plan_within(&seqs, &WIDE, 1);
        // Dropping the newest frees its 3 blocks: enough for the other two.
        assert_eq!(preempt, 1);
        assert_eq!(planned, vec![(0, 1), (1, 1)]);
        // Enough room: nobody leaves.
        assert_eq!(
            plan_within(&seqs, &WIDE, 3),
            (vec![(0, 1), (1, 1), (2, 1)], 0)
        );
        // The last one always runs, even when the cache cannot hold it (the caller fails it).
        let (planned, preempt) = plan_within(&[seq(40, 0)], &WIDE, 0);
        assert_eq!((planned, preempt), (vec![(0, 40)], 0));
    }

    #[test]
    fn rows_give_prompt_logprobs_then_the_sample() {
        let uses = |rows, first, n, prompt, known| -> Vec<RowUse> {
            row_uses(rows, first, n, prompt, known).collect()
        };
        // A 5-token prompt fed 3 then 2 tokens, every row wanted: rows of positions 0..3 give
        // the log-probabilities of tokens 1..4; position 4's row is sampled.
        assert_eq!(
            uses(LogitRows::All, 0, 3, 5, 5),
            [0, 1, 2].map(RowUse::PromptLogprob)
        );
        assert_eq!(
            uses(LogitRows::All, 3, 2, 5, 5),
            [RowUse::PromptLogprob(3), RowUse::Sample]
        );
        // Decode and a completing chunk: one row, sampled. A middle chunk: no row.
        assert_eq!(uses(LogitRows::Last, 7, 1, 5, 8), [RowUse::Sample]);
        assert_eq!(uses(LogitRows::Last, 256, 44, 300, 300), [RowUse::Sample]);
        assert_eq!(uses(LogitRows::None, 0, 64, 300, 300), []);
        assert_eq!(uses(LogitRows::Argmax, 7, 1, 5, 8), []);
        // A recompute after preemption feeding generated tokens with every row: they are
        // skipped up to the last known one.
        assert_eq!(
            uses(LogitRows::All, 3, 4, 4, 7),
            [RowUse::Skip, RowUse::Skip, RowUse::Skip, RowUse::Sample]
        );
    }

    #[test]
    fn logit_rows_follow_the_prompt() {
        assert_eq!(logit_rows(0, 64, 300, false, false), LogitRows::None);
        assert_eq!(logit_rows(0, 64, 300, false, true), LogitRows::None);
        assert_eq!(logit_rows(256, 44, 300, false, false), LogitRows::Last);
        assert_eq!(logit_rows(300, 1, 301, false, false), LogitRows::Last);
        assert_eq!(logit_rows(300, 1, 301, false, true), LogitRows::Argmax);
        assert_eq!(logit_rows(0, 64, 300, true, false), LogitRows::All);
        assert_eq!(logit_rows(0, 64, 300, true, true), LogitRows::All);
    }
}
