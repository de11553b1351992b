//! How a product's rows are cut into the tasks that the pool's threads claim.
//!
//! Two cuts:
//! - [`TaskSplit::even`]: every part's rows in runs of one size. The panel (prefill) schedules
//!   use it: a task is one panel that fits in L2.
//! - [`TaskSplit::guided`]: runs that shrink as the job proceeds (each takes a fixed share of
//!   the rows still unassigned, down to a floor). The streaming (decode) schedules use it:
//!   a decode product lasts tens of microseconds, and with runs of one size the thread that
//!   claims the last run keeps the other waiting for up to a whole run; with shrinking runs the
//!   last ones are small, so both threads finish within a small run of each other, while the
//!   first runs stay long sequential streams.

use super::{Part, ThreadPool, MAX_PARTS};

/// Most tasks a guided cut makes (its runs stay in a fixed array: no allocation per product).
const GUIDED_CAPACITY: usize = 128;

/// A guided run is at least this share of the job's rows (`1 / GUIDED_FLOOR_SHARE`), so the
/// small runs at the end are at most this many.
const GUIDED_FLOOR_SHARE: usize = 64;

/// Fewest rows in a guided run (before rounding to the caller's alignment).
const GUIDED_MIN_ROWS: usize = 16;

/// A job's rows cut into tasks; task `i` covers rows `r0..r1` of one part.
// One lives on the stack per product, so the guided variant's 1.1 KB is not worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Copy)]
pub(super) enum TaskSplit {
    Even {
        rows_per_task: usize,
        /// `first[p]`: the first task of part `p`; `first[parts]` is the task count.
        first: [usize; MAX_PARTS + 1],
        parts: usize,
    },
    Guided {
        /// Task `i`: its part, first row and end row.
        part: [u8; GUIDED_CAPACITY],
        start: [u32; GUIDED_CAPACITY],
        end: [u32; GUIDED_CAPACITY],
        tasks: usize,
    },
}

impl TaskSplit {
    /// Every part's rows in runs of `rows_per_task`, parts one after the other.
    pub(super) fn even(parts: &[Option<Part>], rows_per_task: usize) -> Self {
        let rows_per_task = rows_per_task.max(1);
        let mut first = [0; MAX_PARTS + 1];
        for (p, part) in parts.iter().enumerate() {
            let rows = part.map_or(0, |part| part.w.rows);
            first[p + 1] = first[p] + rows.div_ceil(rows_per_task);
        }
        TaskSplit::Even {
            rows_per_task,
            first,
            parts: parts.len(),
        }
    }

    /// Runs of `1 / (2 * threads)` of the rows not yet assigned, rounded up to a multiple of
    /// `align`, never shorter than a floor (`GUIDED_MIN_ROWS`, and `1 / GUIDED_FLOOR_SHARE`
    /// of the job), parts one after the other (a run ends at its part's end). Runs start at
    /// multiples of `align` within their part.
    pub(super) fn guided(parts: &[Option<Part>], threads: usize, align: usize) -> Self {
        let align = align.max(1);
        let total: usize = parts.iter().flatten().map(|p| p.w.rows).sum();
        let floor = total
            .div_ceil(GUIDED_FLOOR_SHARE)
            .max(GUIDED_MIN_ROWS)
            .next_multiple_of(align);
        let share = 2 * threads.max(1);
        let mut part = [0; GUIDED_CAPACITY];
        let mut start = [0; GUIDED_CAPACITY];
        let mut end = [0; GUIDED_CAPACITY];
        let mut tasks = 0;
        let mut left = total;
        for (p, rows) in parts.iter().map(|p| p.map_or(0, |p| p.w.rows)).enumerate() {
            let mut r = 0;
            while r < rows {
                // Room stays for one task per later part, whatever the sizes came to.
                let size = if tasks + MAX_PARTS >= GUIDED_CAPACITY {
                    rows - r
                } else {
                    (left / share).next_multiple_of(align).max(floor)
                };
                let r1 = (r + size).min(rows);
                part[tasks] = p as u8;
                start[tasks] = r as u32;
                end[tasks] = r1 as u32;
                tasks += 1;
                left -= r1 - r;
                r = r1;
            }
        }
        TaskSplit::Guided {
            part,
            start,
            end,
            tasks,
        }
    }

    /// How many tasks the job has.
    pub(super) fn tasks(&self) -> usize {
        match self {
            TaskSplit::Even { first, parts, .. } => first[*parts],
            TaskSplit::Guided { tasks, .. } => *tasks,
        }
    }

    /// Task `i`'s part, first row and end row (`i < self.tasks()`), given the parts' rows.
    fn locate(&self, i: usize, rows_of: impl Fn(usize) -> usize) -> (usize, usize, usize) {
        match self {
            TaskSplit::Even {
                rows_per_task,
                first,
                parts,
            } => {
                let p = (0..*parts)
                    .find(|&p| i < first[p + 1])
                    .unwrap_or(parts.saturating_sub(1));
                let r0 = (i - first[p]) * rows_per_task;
                (p, r0, (r0 + rows_per_task).min(rows_of(p)))
            }
            TaskSplit::Guided {
                part, start, end, ..
            } => (part[i] as usize, start[i] as usize, end[i] as usize),
        }
    }
}

/// Runs `task(part, r0, r1)` for every task of `split` (rows `r0..r1` of `part`): on the
/// pool when `threads > 1` and there are several tasks, else on this thread.
pub(super) fn run_tasks(
    pool: &ThreadPool,
    threads: usize,
    parts: &[Option<Part>],
    split: &TaskSplit,
    task: impl Fn(&Part, usize, usize) + Sync,
) {
    let rows_of = |p: usize| parts[p].map_or(0, |part| part.w.rows);
    let one = |i: usize| {
        let (p, r0, r1) = split.locate(i, rows_of);
        if let Some(part) = &parts[p] {
            task(part, r0, r1);
        }
    };
    let n_tasks = split.tasks();
    if threads == 1 || n_tasks == 1 {
        (0..n_tasks).for_each(one);
    } else {
        pool.run(n_tasks, &one);
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Matrix, OutPtr, WeightData};
    use super::*;

    fn part(rows: usize, out: &mut [f32]) -> Part<'_> {
        Part {
            w: Matrix {
                data: WeightData::F32(&[]),
                rows,
                cols: 0,
            },
            out: OutPtr::new(out),
        }
    }

    /// Every task's rows, in task order.
    fn runs(split: &TaskSplit, parts: &[Option<Part>]) -> Vec<(usize, usize, usize)> {
        let rows_of = |p: usize| parts[p].map_or(0, |part| part.w.rows);
        (0..split.tasks())
            .map(|i| split.locate(i, rows_of))
            .collect()
    }

    /// Each part's rows are covered once, in order, by runs inside the part.
    fn assert_covers(runs: &[(usize, usize, usize)], rows: &[usize]) {
        for (p, &n) in rows.iter().enumerate() {
            let mut next = 0;
            for &(_, r0, r1) in runs.iter().filter(|run| run.0 == p) {
                assert_eq!(r0, next, "part {p}: a gap or an overlap at row {r0}");
                assert!(r1 > r0 && r1 <= n, "part {p}: run {r0}..{r1} of {n} rows");
                next = r1;
            }
            assert_eq!(next, n, "part {p} not covered");
        }
    }

    #[test]
    fn guided_runs_cover_every_row_once_and_shrink() {
        let mut outs = [vec![0.0; 1], vec![0.0; 1], vec![0.0; 1]];
        let [a, b, c] = &mut outs;
        for (rows, threads, align) in [
            (vec![768, 256, 256], 2, 16),
            (vec![768], 2, 4),
            (vec![32000], 2, 16),
            (vec![32001], 3, 16),
            (vec![5632, 5632], 16, 16),
            (vec![5], 2, 16),
            (vec![0, 100, 0], 2, 4),
            (vec![128256], 64, 1),
        ] {
            let parts: Vec<Option<Part>> = rows
                .iter()
                .zip([&mut *a, &mut *b, &mut *c])
                .map(|(&n, out)| Some(part(n, out)))
                .collect();
            let split = TaskSplit::guided(&parts, threads, align);
            let runs = runs(&split, &parts);
            assert_covers(&runs, &rows);
            assert!(runs.len() <= GUIDED_CAPACITY);
            for &(p, r0, _) in &runs {
                assert_eq!(r0 % align, 0, "{rows:?}: run of part {p} starts at {r0}");
            }
            // Within a part, no run is longer than the one before, except the part's last
            // (cut short by the part's end); the first is at most a `1 / (2 * threads)` share
            // or the floor, and the job's last run is at most the floor.
            let total: usize = rows.iter().sum();
            let floor = total.div_ceil(64).max(16).next_multiple_of(align);
            for (p, &n) in rows.iter().enumerate() {
                let sizes: Vec<usize> = runs
                    .iter()
                    .filter(|run| run.0 == p && run.2 < n)
                    .map(|&(_, r0, r1)| r1 - r0)
                    .collect();
                assert!(
                    sizes.windows(2).all(|w| w[1] <= w[0]),
                    "{rows:?}: part {p} runs grow: {sizes:?}"
                );
            }
            let first = runs.first().map_or(0, |&(_, r0, r1)| r1 - r0);
            let share = total.div_ceil(2 * threads).next_multiple_of(align);
            assert!(first <= share.max(floor), "{rows:?}: first run {first}");
            let last = runs.last().map_or(0, |&(_, r0, r1)| r1 - r0);
            assert!(last <= floor, "{rows:?}: last run {last}, floor {floor}");
            if threads == 2 && total >= 4096 {
                assert!(runs.len() >= 8 && last * 8 <= first, "{rows:?}: {runs:?}");
            }
        }
    }

    #[test]
    fn even_runs_cover_every_row_once() {
        let mut outs = [vec![0.0; 1], vec![0.0; 1]];
        let [a, b] = &mut outs;
        let parts = [Some(part(100, a)), None, Some(part(33, b))];
        let split = TaskSplit::even(&parts, 16);
        let runs = runs(&split, &parts);
        assert_eq!(runs.len(), 7 + 3);
        assert!(runs.iter().all(|&(_, r0, r1)| r1 - r0 <= 16));
        assert_covers(&runs, &[100, 0, 33]);
    }
}
