//! A small seeded random number generator (SplitMix64), so tiny models are reproducible.
//!
//! candle's CPU RNG cannot be seeded, so random weights are drawn here.

const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn to_unit(bits: u64) -> f64 {
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

/// A seed for the sub-stream `(a, b)` of `key` (e.g. dropout call `a`, sample row `b`):
/// distinct inputs give unrelated streams, and the result depends on nothing else.
pub fn sub_seed(key: u64, a: u64, b: u64) -> u64 {
    mix(mix(key ^ mix(a.wrapping_add(GAMMA)))
        .wrapping_add(mix(b.wrapping_mul(GAMMA) ^ 0xD6E8_FEB8_6659_FD93)))
}

/// SplitMix64: fast, seedable, good enough for initialising weights.
#[derive(Clone, Debug)]
pub struct Rng {
    state: u64,
}

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Rng {
            state: seed ^ 0x9E37_79B9_7F4A_7C15,
        }
    }

    /// The internal state (to save and later continue the same stream).
    pub fn state(&self) -> u64 {
        self.state
    }

    /// A generator continuing from a saved [`Rng::state`].
    pub fn from_state(state: u64) -> Self {
        Rng { state }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GAMMA);
        mix(self.state)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        to_unit(self.next_u64())
    }

    /// Fill `out` with what `n` calls of [`Rng::uniform`] mapped by `f` would give, in parallel
    /// (SplitMix64's k-th value depends only on the state and k), advancing the stream past them.
    pub fn fill_uniform<T: Send>(&mut self, out: &mut [T], f: impl Fn(f64) -> T + Sync) {
        use rayon::prelude::*;
        const CHUNK: usize = 1 << 14;
        let start = self.state;
        let fill = |c: usize, chunk: &mut [T]| {
            let mut st = start.wrapping_add(GAMMA.wrapping_mul((c * CHUNK) as u64));
            for o in chunk {
                st = st.wrapping_add(GAMMA);
                *o = f(to_unit(mix(st)));
            }
        };
        if out.len() <= CHUNK {
            fill(0, out); // no pool hand-off for a small mask
        } else {
            out.par_chunks_mut(CHUNK)
                .enumerate()
                .for_each(|(c, chunk)| fill(c, chunk));
        }
        self.state = start.wrapping_add(GAMMA.wrapping_mul(out.len() as u64));
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// `n` values from N(0, std²) as f32.
    pub fn normal_vec(&mut self, n: usize, std: f64) -> Vec<f32> {
        (0..n).map(|_| (self.normal() * std) as f32).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream_and_moments() {
        let a = Rng::new(7).normal_vec(20000, 1.0);
        let b = Rng::new(7).normal_vec(20000, 1.0);
        assert_eq!(a, b);
        let c = Rng::new(8).normal_vec(4, 1.0);
        assert_ne!(a[..4], c[..]);
        let mean: f64 = a.iter().map(|&x| x as f64).sum::<f64>() / a.len() as f64;
        let var: f64 = a.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / a.len() as f64;
        assert!(mean.abs() < 0.03, "mean {mean}");
        assert!((var - 1.0).abs() < 0.05, "var {var}");
    }

    #[test]
    fn parallel_fill_is_the_serial_stream() {
        let mut serial = Rng::new(3);
        let mut parallel = Rng::new(3);
        serial.next_u64();
        parallel.next_u64();
        // More than one parallel chunk, not a multiple of it.
        let want: Vec<f64> = (0..40_000).map(|_| serial.uniform()).collect();
        let mut got = vec![0f64; 40_000];
        parallel.fill_uniform(&mut got, |u| u);
        assert_eq!(got, want);
        assert_eq!(parallel.state(), serial.state());
        assert_eq!(parallel.next_u64(), serial.next_u64());
    }
}
