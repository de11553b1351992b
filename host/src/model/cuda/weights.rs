//! The model's weights on the device, uploaded once in their stored dtype (f32, f16, bf16).
//! q/k/v are stacked into one matrix and gate/up into another, so each runs as one product
//! over the same input; gate/up interleaved in runs of 8 rows, so that the product's kernel
//! has each gate row's up row at hand and writes the SwiGLU itself.

use super::memory::DeviceBuffer;
use crate::model::cpu::matmul::WeightData;
use crate::model::llama::{Linear, ModelWeights};
use crate::model::weights::{DType, Tensor};
use cudarc::driver::{sys, DriverError};

/// Element type of a device matrix; the index picks the kernel variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DevDType {
    F32 = 0,
    F16 = 1,
    Bf16 = 2,
}

/// A `[rows, cols]` matrix on the device, with its bias (f32) when it has one.
pub struct DevMatrix {
    pub buf: DeviceBuffer,
    pub dtype: DevDType,
    pub rows: usize,
    pub cols: usize,
    pub bias: Option<DeviceBuffer>,
}

impl DevMatrix {
    pub fn view(&self) -> super::products::MatrixView {
        super::products::MatrixView {
            ptr: self.buf.ptr(),
            dtype: self.dtype as usize,
            rows: self.rows,
            cols: self.cols,
            bias: self.bias.as_ref().map(DeviceBuffer::ptr),
        }
    }
}

pub struct DevLayer {
    pub input_norm: DeviceBuffer,
    pub qkv: DevMatrix,
    pub o: DevMatrix,
    pub post_norm: DeviceBuffer,
    /// `2 × inter` rounded up to 16 rows, interleaved ([`interleave_gate_up`]).
    pub gate_up: DevMatrix,
    pub down: DevMatrix,
}

pub struct DevWeights {
    pub embed: DevMatrix,
    pub layers: Vec<DevLayer>,
    pub norm: DeviceBuffer,
    /// `None` when tied to the embedding.
    pub lm_head: Option<DevMatrix>,
    /// Bytes uploaded.
    pub bytes: usize,
}

impl DevWeights {
    pub fn lm_head(&self) -> &DevMatrix {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }
}

/// Why weights cannot go to the device: a type the kernels do not read.
pub fn unsupported_dtype(weights: &ModelWeights) -> Option<&'static str> {
    let mut tensors = vec![&weights.embed_tokens];
    tensors.extend(weights.lm_head.as_ref());
    for l in &weights.layers {
        tensors.extend(l.linears().map(|lin| &lin.weight));
    }
    tensors
        .into_iter()
        .find(|t| matches!(t.dtype, DType::Quant(_)))
        .map(|t| t.dtype.name())
}

/// The bytes of `tensors` stacked row-wise, in their common dtype, or widened to f32 when
/// they differ (a GGUF file may mix f16 and f32).
fn stacked_bytes(tensors: &[&Tensor]) -> (DevDType, Vec<u8>) {
    let common = tensors[0].dtype;
    let same = tensors.iter().all(|t| t.dtype == common);
    let mut bytes = Vec::new();
    let dtype = match (same, common) {
        (true, DType::F16) => DevDType::F16,
        (true, DType::Bf16) => DevDType::Bf16,
        _ => DevDType::F32,
    };
    for t in tensors {
        match (dtype, t.data()) {
            (DevDType::F16, WeightData::F16(bits)) | (DevDType::Bf16, WeightData::Bf16(bits)) => {
                bytes.extend_from_slice(bytemuck::cast_slice(bits))
            }
            (_, WeightData::F32(v)) => bytes.extend_from_slice(bytemuck::cast_slice(v)),
            _ => bytes.extend_from_slice(bytemuck::cast_slice(&t.to_f32_vec())),
        }
    }
    (dtype, bytes)
}

/// Uploads `(weight, bias)` parts stacked row-wise as one matrix.
fn upload_parts(
    parts: &[(&Tensor, Option<&[f32]>)],
    stream: sys::CUstream,
) -> Result<DevMatrix, DriverError> {
    let tensors: Vec<&Tensor> = parts.iter().map(|(t, _)| *t).collect();
    let (dtype, bytes) = stacked_bytes(&tensors);
    let rows = tensors.iter().map(|t| t.shape[0]).sum();
    let cols = tensors[0].shape.get(1).copied().unwrap_or(1);
    let bias = if parts.iter().any(|(_, b)| b.is_some()) {
        let mut all = Vec::with_capacity(rows);
        for (t, b) in parts {
            match b {
                Some(b) => all.extend_from_slice(b),
                None => all.extend(std::iter::repeat_n(0.0f32, t.shape[0])),
            }
        }
        Some(DeviceBuffer::upload(&all, stream)?)
    } else {
        None
    };
    Ok(DevMatrix {
        buf: DeviceBuffer::upload(&bytes, stream)?,
        dtype,
        rows,
        cols,
        bias,
    })
}

/// Gate and up rows (`row_len` elements each, as many of both) interleaved as the SwiGLU
/// kernels read them (`gate_row` in kernels/common.cuh): runs of 8 gate rows, each followed by
/// the 8 matching up rows, the row count padded to a multiple of 8 with zero rows.
pub fn interleave_gate_up<T: Copy + Default>(gate: &[T], up: &[T], row_len: usize) -> Vec<T> {
    let rows = gate.len() / row_len.max(1);
    let padded = rows.next_multiple_of(8);
    let mut out = vec![T::default(); 2 * padded * row_len];
    for i in 0..rows {
        let at = (16 * (i / 8) + i % 8) * row_len;
        let from = i * row_len..(i + 1) * row_len;
        out[at..at + row_len].copy_from_slice(&gate[from.clone()]);
        out[at + 8 * row_len..at + 9 * row_len].copy_from_slice(&up[from]);
    }
    out
}

/// Uploads the gate and up projections as one matrix interleaved for the SwiGLU kernels
/// ([`interleave_gate_up`]), bias too.
fn upload_gate_up(
    gate: &Linear,
    up: &Linear,
    stream: sys::CUstream,
) -> Result<DevMatrix, DriverError> {
    let (dtype, bytes) = stacked_bytes(&[&gate.weight, &up.weight]);
    let (inter, cols) = (
        gate.weight.shape[0],
        gate.weight.shape.get(1).copied().unwrap_or(1),
    );
    let (gate_bytes, up_bytes) = bytes.split_at(bytes.len() / 2);
    let row_bytes = gate_bytes.len() / inter.max(1);
    let bias = if gate.bias.is_some() || up.bias.is_some() {
        let zeros = vec![0.0f32; inter];
        let (g, u) = (gate.bias.as_deref(), up.bias.as_deref());
        let all = interleave_gate_up(g.unwrap_or(&zeros), u.unwrap_or(&zeros), 1);
        Some(DeviceBuffer::upload(&all, stream)?)
    } else {
        None
    };
    let interleaved = interleave_gate_up(gate_bytes, up_bytes, row_bytes);
    Ok(DevMatrix {
        buf: DeviceBuffer::upload(&interleaved, stream)?,
        dtype,
        rows: 2 * inter.next_multiple_of(8),
        cols,
        bias,
    })
}

fn upload_linears(parts: &[&Linear], stream: sys::CUstream) -> Result<DevMatrix, DriverError> {
    let parts: Vec<(&Tensor, Option<&[f32]>)> = parts
        .iter()
        .map(|l| (&l.weight, l.bias.as_deref()))
        .collect();
    upload_parts(&parts, stream)
}

pub fn upload(weights: &ModelWeights, stream: sys::CUstream) -> Result<DevWeights, DriverError> {
    let mut bytes = 0;
    let mut count = |m: &DevMatrix| bytes += m.buf.bytes();
    let embed = upload_parts(&[(&weights.embed_tokens, None)], stream)?;
    count(&embed);
    let mut layers = Vec::with_capacity(weights.layers.len());
    for l in &weights.layers {
        let layer = DevLayer {
            input_norm: DeviceBuffer::upload(&l.input_layernorm, stream)?,
            qkv: upload_linears(&[&l.q_proj, &l.k_proj, &l.v_proj], stream)?,
            o: upload_linears(&[&l.o_proj], stream)?,
            post_norm: DeviceBuffer::upload(&l.post_attention_layernorm, stream)?,
            gate_up: upload_gate_up(&l.gate_proj, &l.up_proj, stream)?,
            down: upload_linears(&[&l.down_proj], stream)?,
        };
        for m in [&layer.qkv, &layer.o, &layer.gate_up, &layer.down] {
            count(m);
        }
        layers.push(layer);
    }
    let lm_head = match &weights.lm_head {
        Some(t) => Some(upload_parts(&[(t, None)], stream)?),
        None => None,
    };
    if let Some(m) = &lm_head {
        count(m);
    }
    Ok(DevWeights {
        embed,
        layers,
        norm: DeviceBuffer::upload(&weights.norm, stream)?,
        lm_head,
        bytes,
    })
}
