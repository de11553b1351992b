//! Single kernels run on host data, for tests that compare each kernel with the CPU's code on
//! random inputs (`tests/cuda.rs`). Each call uploads its inputs, launches the kernel the
//! forward pass uses, exactly as the pass does, and reads the result back.

use super::attention::{attention, Attention, MAX_ATTENTION_SPLITS};
use super::backend::{open_device, OpenDevice};
use super::kernels::{rms_norm, silu_mul, Arg};
use super::memory::DeviceBuffer;
use super::products::{matmul, swiglu_product, Input, MatrixView};
use super::weights::{interleave_gate_up, DevDType};
use crate::model::weights::DType;
use cudarc::driver::CudaFunction;

/// What [`KernelCheck::product`] feeds a product, `tokens` rows of `cols` values.
pub enum ProductInput<'a> {
    Rows(&'a [f32]),
    /// The RMSNorm of the rows of `x` with `weight` (`cols` values) and `eps`.
    Normed {
        x: &'a [f32],
        weight: &'a [f32],
        eps: f32,
    },
}

fn dev_dtype(dtype: DType) -> anyhow::Result<DevDType> {
    Ok(match dtype {
        DType::F32 => DevDType::F32,
        DType::F16 => DevDType::F16,
        DType::Bf16 => DevDType::Bf16,
        other => anyhow::bail!("no CUDA product for {}", other.name()),
    })
}

fn dev(e: cudarc::driver::DriverError) -> anyhow::Error {
    anyhow::anyhow!("CUDA: {e:?}")
}

/// The kernels of one device, callable one at a time.
pub struct KernelCheck {
    device: OpenDevice,
}

/// Inputs of one attention launch: queries and a paged cache, laid out as the pass has them.
pub struct AttentionCase<'a> {
    /// `[token][heads * d]`.
    pub q: &'a [f32],
    /// `[slot][kv_heads * d]` keys and values.
    pub keys: &'a [f32],
    pub values: &'a [f32],
    /// Block tables of all sequences, one after another.
    pub tables: &'a [i32],
    /// Per token: where its sequence's table starts in `tables`, and its position.
    pub offsets: &'a [i32],
    pub positions: &'a [i32],
    pub heads: usize,
    pub kv_heads: usize,
    pub d: usize,
    /// Sliding window (0: none).
    pub window: usize,
    /// Splits along the keys.
    pub splits: usize,
    /// Whether the cache stores f16 (the keys and values are rounded to it) instead of f32.
    pub f16_cache: bool,
}

impl KernelCheck {
    pub fn open(ordinal: usize) -> anyhow::Result<KernelCheck> {
        Ok(KernelCheck {
            device: open_device(ordinal)?,
        })
    }

    /// The architecture the kernels were compiled for (`sm_90`).
    pub fn arch(&self) -> &str {
        &self.device.arch
    }

    /// Why products of several tokens with bf16 weights do not run on the tensor cores, or
    /// None when they do (after the start-up check, as in the forward pass).
    pub fn tensor_cores_off(&self) -> Option<&str> {
        self.device.tensor_cores_off.as_deref()
    }

    /// Runs the products that follow on the CUDA cores (`false`), or on the tensor cores
    /// where the pass would (`true`, the default).
    pub fn use_tensor_cores(&mut self, on: bool) {
        self.device.kernels.tensor_cores = on && self.device.tensor_cores_off.is_none();
    }

    /// Why kernels are not launched as programmatic dependent launches, or None when they
    /// are (after the start-up check, as in the forward pass).
    pub fn dependent_launch_off(&self) -> Option<&str> {
        self.device.dependent_launch_off.as_deref()
    }

    /// Launches `func`, one of the device's kernels, on its stream.
    fn launch(
        &self,
        func: &CudaFunction,
        grid: (u32, u32, u32),
        block: u32,
        args: &[Arg],
    ) -> anyhow::Result<()> {
        let (k, stream) = (&self.device.kernels, &self.device.stream);
        k.launch(stream, func, grid, block, args).map_err(dev)
    }

    fn up<T: Copy>(&self, data: &[T]) -> anyhow::Result<DeviceBuffer> {
        self.device.ctx.bind_to_thread().map_err(dev)?;
        DeviceBuffer::upload(data, self.device.stream.cu_stream()).map_err(dev)
    }

    fn down<T: Copy + Default>(&self, buf: &DeviceBuffer, len: usize) -> anyhow::Result<Vec<T>> {
        buf.read_vec(len, self.device.stream.cu_stream())
            .map_err(dev)
    }

    fn out(&self, floats: usize) -> anyhow::Result<DeviceBuffer> {
        // Poisoned with NaN bytes (0xff): an element the kernel misses shows up.
        let buf = DeviceBuffer::alloc(floats * 4).map_err(dev)?;
        // SAFETY: within the allocation.
        unsafe {
            cudarc::driver::result::memset_d8_async(
                buf.ptr(),
                0xff,
                floats * 4,
                self.device.stream.cu_stream(),
            )
        }
        .map_err(dev)?;
        Ok(buf)
    }

    /// `y (+)= x · Wᵀ` for `tokens` rows of x through the pass's product kernels (GEMVs up to
    /// 64 tokens, tiled GEMMs beyond); `w` holds `rows × cols` elements of `dtype` (f32, f16
    /// or bf16) as bytes. With `y0`, the product is added to it.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul(
        &self,
        dtype: DType,
        w: &[u8],
        rows: usize,
        cols: usize,
        x: &[f32],
        tokens: usize,
        y0: Option<&[f32]>,
    ) -> anyhow::Result<Vec<f32>> {
        self.product(dtype, w, rows, cols, ProductInput::Rows(x), tokens, y0)
    }

    /// [`Self::matmul`] of what `input` describes: the rows, or their RMSNorm (which the GEMVs
    /// apply as they read the rows).
    #[allow(clippy::too_many_arguments)]
    pub fn product(
        &self,
        dtype: DType,
        w: &[u8],
        rows: usize,
        cols: usize,
        input: ProductInput,
        tokens: usize,
        y0: Option<&[f32]>,
    ) -> anyhow::Result<Vec<f32>> {
        let dtype = dev_dtype(dtype)?;
        let wb = self.up(w)?;
        let (input, _held) = self.input(input, tokens, cols)?;
        let yb = match y0 {
            Some(y) => self.up(y)?,
            None => self.out(rows * tokens)?,
        };
        let view = MatrixView {
            ptr: wb.ptr(),
            dtype: dtype as usize,
            rows,
            cols,
            bias: None,
        };
        let d = &self.device;
        let accumulate = y0.is_some();
        matmul(
            &d.stream,
            &d.kernels,
            &view,
            input,
            yb.ptr(),
            tokens,
            accumulate,
        )
        .map_err(dev)?;
        self.down(&yb, rows * tokens)
    }

    /// The device copy of a product's input, with the buffers behind it (kept alive until the
    /// product has run).
    fn input(
        &self,
        input: ProductInput,
        tokens: usize,
        cols: usize,
    ) -> anyhow::Result<(Input, Vec<DeviceBuffer>)> {
        Ok(match input {
            ProductInput::Rows(x) => {
                let xb = self.up(x)?;
                (Input::Rows(xb.ptr()), vec![xb])
            }
            ProductInput::Normed { x, weight, eps } => {
                let (xb, nb, sb) = (self.up(x)?, self.up(weight)?, self.out(tokens * cols)?);
                let input = Input::Normed {
                    x: xb.ptr(),
                    weight: nb.ptr(),
                    eps,
                    scratch: sb.ptr(),
                };
                (input, vec![xb, nb, sb])
            }
        })
    }

    /// The SwiGLU of the gate/up product as the pass computes it, `inter` values a token:
    /// `gate` and `up` (`inter × cols` elements of `dtype` each, as bytes) interleaved as the
    /// pass uploads them, with their biases, and fed `input` (the GEMV and tensor-core kernels
    /// write the SwiGLU themselves; after a tiled GEMM, `silu_mul` does).
    #[allow(clippy::too_many_arguments)]
    pub fn swiglu_product(
        &self,
        dtype: DType,
        gate: &[u8],
        up: &[u8],
        (inter, cols): (usize, usize),
        bias: Option<(&[f32], &[f32])>,
        input: ProductInput,
        tokens: usize,
    ) -> anyhow::Result<Vec<f32>> {
        let dev_type = dev_dtype(dtype)?;
        let row_bytes = gate.len() / inter.max(1);
        let wb = self.up(&interleave_gate_up(gate, up, row_bytes))?;
        let bb = match bias {
            Some((g, u)) => Some(self.up(&interleave_gate_up(g, u, 1))?),
            None => None,
        };
        let rows = 2 * inter.next_multiple_of(8);
        let (input, _held) = self.input(input, tokens, cols)?;
        let (out, scratch) = (self.out(tokens * inter)?, self.out(tokens * rows)?);
        let view = MatrixView {
            ptr: wb.ptr(),
            dtype: dev_type as usize,
            rows,
            cols,
            bias: bb.as_ref().map(|b| b.ptr()),
        };
        let d = &self.device;
        let (o, sc) = (out.ptr(), scratch.ptr());
        swiglu_product(&d.stream, &d.kernels, &view, input, o, sc, tokens, inter).map_err(dev)?;
        self.down(&out, tokens * inter)
    }

    /// `out = rmsnorm(x) * w` row by row, as the norm kernel computes it.
    pub fn rms_norm(&self, x: &[f32], w: &[f32], eps: f32) -> anyhow::Result<Vec<f32>> {
        let h = w.len();
        let rows = x.len() / h;
        let (xb, wb, ob) = (self.up(x)?, self.up(w)?, self.out(x.len())?);
        let d = &self.device;
        let (xp, wp, op) = (xb.ptr(), wb.ptr(), ob.ptr());
        rms_norm(&d.stream, &d.kernels, xp, wp, op, rows, h, eps).map_err(dev)?;
        self.down(&ob, x.len())
    }

    /// SwiGLU over fused `[gate | up]` rows of `2 * inter`.
    pub fn silu_mul(&self, gate_up: &[f32], inter: usize) -> anyhow::Result<Vec<f32>> {
        let n = gate_up.len() / 2;
        // The kernel reads each token's gate and up interleaved, as the product writes them.
        let interleaved: Vec<f32> = gate_up
            .chunks(2 * inter)
            .flat_map(|row| interleave_gate_up(&row[..inter], &row[inter..], 1))
            .collect();
        let (gb, ob) = (self.up(&interleaved)?, self.out(n)?);
        let d = &self.device;
        let tokens = n / inter;
        silu_mul(&d.stream, &d.kernels, gb.ptr(), ob.ptr(), tokens, inter).map_err(dev)?;
        self.down(&ob, n)
    }

    /// RoPE with the KV append on fused q/k/v rows (`stride` floats a token): the rows with
    /// q rotated, and the cache's keys and values (`slots_total` slots of `kv_heads * d`), in
    /// f32 or, with `f16_cache`, stored as f16 (widened back here).
    #[allow(clippy::too_many_arguments)]
    pub fn rope_kv_append(
        &self,
        qkv: &[f32],
        stride: usize,
        (heads, kv_heads, d): (usize, usize, usize),
        cos: &[f32],
        sin: &[f32],
        slots: &[i32],
        slots_total: usize,
        f16_cache: bool,
    ) -> anyhow::Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let tokens = qkv.len() / stride;
        let cache = slots_total * kv_heads * d;
        let (rb, cb, sb, slb) = (self.up(qkv)?, self.up(cos)?, self.up(sin)?, self.up(slots)?);
        // Poisoned as `out` does, in either type (0xffff is an f16 NaN).
        let element = if f16_cache { 2 } else { 4 };
        let floats = (cache * element).div_ceil(4);
        let (kb, vb) = (self.out(floats)?, self.out(floats)?);
        self.launch(
            &self.device.kernels.rope_kv_append[f16_cache as usize],
            (tokens as u32, 1, 1),
            128,
            &[
                Arg::Ptr(rb.ptr()),
                Arg::I32(stride as i32),
                Arg::I32(heads as i32),
                Arg::I32(kv_heads as i32),
                Arg::I32(d as i32),
                Arg::Ptr(cb.ptr()),
                Arg::Ptr(sb.ptr()),
                Arg::Ptr(slb.ptr()),
                Arg::Ptr(kb.ptr()),
                Arg::Ptr(vb.ptr()),
            ],
        )?;
        let widened = |buf: &DeviceBuffer| -> anyhow::Result<Vec<f32>> {
            if !f16_cache {
                return self.down(buf, cache);
            }
            let bits: Vec<u16> = self.down(buf, cache)?;
            Ok(bits
                .iter()
                .map(|&b| half::f16::from_bits(b).to_f32())
                .collect())
        };
        Ok((self.down(&rb, qkv.len())?, widened(&kb)?, widened(&vb)?))
    }

    /// Attention of every token of `case` over the cache: `[token][heads * d]`.
    pub fn attention(&self, case: &AttentionCase) -> anyhow::Result<Vec<f32>> {
        let n = case.positions.len();
        let first = |pos: i32| {
            if case.window > 0 {
                (pos + 1 - case.window as i32).max(0)
            } else {
                0
            }
        };
        let longest = case
            .positions
            .iter()
            .map(|&p| (p + 1 - first(p)) as usize)
            .max()
            .unwrap_or(1);
        anyhow::ensure!(
            (1..=MAX_ATTENTION_SPLITS).contains(&case.splits),
            "attention takes 1 to {MAX_ATTENTION_SPLITS} splits"
        );
        let split_keys = longest.div_ceil(case.splits).max(1);
        // An f16 cache holds the keys and values rounded as the CPU's f16 cache rounds them.
        let cache = |values: &[f32]| -> anyhow::Result<DeviceBuffer> {
            if !case.f16_cache {
                return self.up(values);
            }
            let mut bits = vec![0u16; values.len()];
            crate::model::cpu::matmul::round_to_f16(values, &mut bits);
            self.up(&bits)
        };
        let (qb, kb, vb) = (self.up(case.q)?, cache(case.keys)?, cache(case.values)?);
        let (tb, ob, pb) = (
            self.up(case.tables)?,
            self.up(case.offsets)?,
            self.up(case.positions)?,
        );
        let part_ml = self.out(n * case.heads * case.splits * 2)?;
        let part_acc = self.out(n * case.heads * case.splits * case.d)?;
        let out = self.out(n * case.heads * case.d)?;
        let counters = self.up(&vec![0i32; n * case.heads])?;
        let heads = Attention {
            q: qb.ptr(),
            q_stride: case.heads * case.d,
            keys: kb.ptr(),
            values: vb.ptr(),
            f16_cache: case.f16_cache,
            tables: tb.ptr(),
            offsets: ob.ptr(),
            positions: pb.ptr(),
            tokens: n,
            heads: case.heads,
            kv_heads: case.kv_heads,
            d: case.d,
            window: case.window,
            scale: 1.0 / (case.d as f32).sqrt(),
            splits: case.splits,
            split_keys,
            part_ml: part_ml.ptr(),
            part_acc: part_acc.ptr(),
            counters: counters.ptr(),
            out: out.ptr(),
        };
        attention(&self.device.stream, &self.device.kernels, &heads).map_err(dev)?;
        // Every launch leaves the counters at zero, ready for the next.
        let left: Vec<i32> = self.down(&counters, n * case.heads)?;
        anyhow::ensure!(
            left.iter().all(|&c| c == 0),
            "attention left split counters set"
        );
        self.down(&out, n * case.heads * case.d)
    }

    /// The index of each row's largest value (lowest on ties), and its log-probability under
    /// the row's softmax.
    pub fn argmax(&self, logits: &[f32], vocab: usize) -> anyhow::Result<(Vec<u32>, Vec<f32>)> {
        let rows = logits.len() / vocab.max(1);
        let (lb, ob, pb) = (self.up(logits)?, self.out(rows)?, self.out(rows)?);
        self.launch(
            &self.device.kernels.argmax_rows,
            (rows as u32, 1, 1),
            1024,
            &[
                Arg::Ptr(lb.ptr()),
                Arg::I32(vocab as i32),
                Arg::Ptr(ob.ptr()),
                Arg::Ptr(pb.ptr()),
            ],
        )?;
        Ok((self.down(&ob, rows)?, self.down(&pb, rows)?))
    }

    /// Rows `ids` of an embedding table of `h` columns, widened to f32.
    pub fn embed(
        &self,
        dtype: DType,
        table: &[u8],
        ids: &[u32],
        h: usize,
    ) -> anyhow::Result<Vec<f32>> {
        let variant = match dtype {
            DType::F32 => DevDType::F32,
            DType::F16 => DevDType::F16,
            DType::Bf16 => DevDType::Bf16,
            other => anyhow::bail!("no CUDA embedding for {}", other.name()),
        } as usize;
        let (tb, ib, ob) = (self.up(table)?, self.up(ids)?, self.out(ids.len() * h)?);
        self.launch(
            &self.device.kernels.embed[variant],
            (ids.len() as u32, 1, 1),
            256,
            &[
                Arg::Ptr(tb.ptr()),
                Arg::Ptr(ib.ptr()),
                Arg::Ptr(ob.ptr()),
                Arg::I32(h as i32),
            ],
        )?;
        self.down(&ob, ids.len() * h)
    }
}
