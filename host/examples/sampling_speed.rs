//! Time per token of choosing the next token from one row of logits, by sampling setting and
//! vocabulary size: `cargo run --release --example sampling_speed`.
//!
//! The rows look like a model's: most logits spread over [-8, -2], one in 2,000 raised by 12.

use std::time::Instant;

use cllm::model::logprobs::{logprob_of, token_logprobs};
use cllm::model::rng::Rng;
use cllm::model::sampling::{Sampler, SamplingParams};

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
}
