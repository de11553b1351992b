//! Time per token of choosing the next token from one row of logits, by sampling setting and
//! vocabulary size, and of one scheduler step's choices for 64 sampled sequences on one thread
//! and on every core: `cargo run --release --example sampling_speed`.
//!
//! The rows look like a model's: most logits spread over [-8, -2], one in 2,000 raised by 12.

use std::time::Instant;

use cllm::model::cpu::pool::ThreadPool;
use cllm::model::generation::{Generation, GenerationParams};
use cllm::model::logprobs::{logprob_of, token_logprobs};
use cllm::model::rng::Rng;
use cllm::model::sampling::{Sampler, SamplingParams};
use cllm::scheduler::choices::{choose_all, Pick};

fn main() {
    let settings = [
        ("greedy", 0.0, 0, 1.0),
        ("temperature 1", 1.0, 0, 1.0),
        ("temperature 0.7, top_p 0.9", 0.7, 0, 0.9),
        ("temperature 0.1, top_p 0.9", 0.1, 0, 0.9),
        ("top_k 40", 1.0, 40, 1.0),
        ("top_k 50, top_p 0.95", 0.8, 50, 0.95),
    ];
    for vocab in [32_000usize, 49_152, 128_256] {
        let mut rng = Rng::new(7);
        let logits: Vec<f32> = (0..vocab)
            .map(|_| {
                let u = rng.next_f64() as f32;
                -8.0 + 6.0 * u + if u > 0.9995 { 12.0 } else { 0.0 }
            })
            .collect();
        for (name, temperature, top_k, top_p) in settings {
            let params = SamplingParams {
                do_sample: temperature > 0.0,
                temperature,
                top_k,
                top_p,
                seed: 1,
                ..Default::default()
            };
            let mut sampler = Sampler::new(params, vocab);
            let mut row = logits.clone();
            let rounds = 300;
            let start = Instant::now();
            let mut checksum = 0u64;
            for _ in 0..rounds {
                // `sample` may change the row (penalties): each round starts from the same.
                row.copy_from_slice(&logits);
                checksum += u64::from(sampler.sample(&mut row));
            }
            let us = start.elapsed().as_secs_f64() * 1e6 / rounds as f64;
            println!(
                "vocabulary {vocab:>7}, {name:<28} {us:>8.1} us a token (checksum {checksum})"
            );
        }
        // What `logprobs: 5` adds to a token, and a prompt token's log-probability.
        let rounds = 300;
        let mut scratch = Vec::new();
        let start = Instant::now();
        let mut checksum = 0.0f64;
        for i in 0..rounds {
            let lp = token_logprobs(&logits, i, 5, &mut scratch);
            checksum += f64::from(lp.logprob) + f64::from(lp.top[4].1);
        }
        let us = start.elapsed().as_secs_f64() * 1e6 / rounds as f64;
        println!(
            "vocabulary {vocab:>7}, {:<28} {us:>8.1} us a token (checksum {checksum:.3})",
            "logprobs 5"
        );
        let start = Instant::now();
        let mut checksum = 0.0f64;
        for i in 0..rounds {
            checksum += f64::from(logprob_of(&logits, i));
        }
        let us = start.elapsed().as_secs_f64() * 1e6 / rounds as f64;
        println!(
            "vocabulary {vocab:>7}, {:<28} {us:>8.1} us a token (checksum {checksum:.3})",
            "a prompt token's logprob"
        );
    }
    step_of_sampled_sequences(64, 49_152);
}

/// One scheduler step's choices for `n` sequences sampling at temperature 1 (each its own
/// seed), on the caller's thread alone and on a pool of every core.
fn step_of_sampled_sequences(n: usize, vocab: usize) {
    let mut rng = Rng::new(3);
    let logits: Vec<f32> = (0..n * vocab)
        .map(|_| -8.0 + 6.0 * rng.next_f64() as f32)
        .collect();
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    for threads in [1, cores] {
        let pool = ThreadPool::new(threads);
        let mut generations: Vec<Generation> = (0..n)
            .map(|i| {
                let params = GenerationParams {
                    sampling: SamplingParams {
                        do_sample: true,
                        seed: i as u64,
                        ..Default::default()
                    },
                    ..Default::default()
                };
                Generation::new(params, &[], &[], vocab)
            })
            .collect();
        let mut rows = logits.clone();
        let rounds = 50;
        let mut elapsed = std::time::Duration::ZERO;
        let mut checksum = 0u64;
        for _ in 0..rounds {
            // Sampling may change the rows: each round starts from the same (not timed).
            rows.copy_from_slice(&logits);
            let picks = rows.chunks_exact_mut(vocab).map(Pick::Row).collect();
            let start = Instant::now();
            let choices = choose_all(&pool, generations.iter_mut(), picks);
            elapsed += start.elapsed();
            checksum += choices
                .iter()
                .flatten()
                .map(|c| u64::from(c.id))
                .sum::<u64>();
        }
        let us = elapsed.as_secs_f64() * 1e6 / rounds as f64;
        println!(
            "{n} sequences, vocabulary {vocab}, temperature 1, {threads} thread(s): {us:>8.1} us a step (checksum {checksum})"
        );
    }
}
