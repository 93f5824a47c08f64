//! `x · Wᵀ` for a frozen weight W whose backward returns the input gradient only.
//!
//! candle's `matmul` backward always computes and keeps the right-hand side's gradient, even
//! when that side is an untracked frozen weight (shared formats.md §2): one extra `dW` GEMM per
//! linear and a weight-sized tensor left in the `GradStore` (≈ 13 GB for a 7B bf16 model).
//! [`frozen_matmul_t`] runs the very same backend GEMM in its forward, and its `bwd` returns
//! `(Some(grad · W), None)`.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp2, Layout, MetalStorage, Result, Shape, Tensor,
};

/// The custom op: arg1 = x (m × k), arg2 = Wᵀ (k × n, any strides, usually W's transposed view).
struct FrozenMatmul;

fn mnk(l1: &Layout, l2: &Layout) -> Result<(usize, usize, usize, Shape)> {
    let (m, k) = l1.shape().dims2()?;
    let (k2, n) = l2.shape().dims2()?;
    if k != k2 {
        candle_core::bail!("frozen matmul: inner dimensions differ ({m}×{k} · {k2}×{n})");
    }
    Ok((m, n, k, Shape::from((m, n))))
}

fn fwd<S: BackendStorage>(s1: &S, l1: &Layout, s2: &S, l2: &Layout) -> Result<(S, Shape)> {
    let (m, n, k, shape) = mnk(l1, l2)?;
    let out = s1.matmul(s2, (1, m, n, k), l1, l2)?;
    Ok((out, shape))
}

impl CustomOp2 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fwd(s1, l1, s2, l2)
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        fwd(s1, l1, s2, l2)
    }

    fn metal_fwd(
        &self,
        s1: &MetalStorage,
        l1: &Layout,
        s2: &MetalStorage,
        l2: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        fwd(s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        _x: &Tensor,
        w_t: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // d/dx (x Wᵀ) = grad · W; W itself is frozen: no gradient computed or stored.
        Ok((Some(grad.matmul(&w_t.t()?)?), None))
    }
}

/// `x · wᵀ` for a 2-D `x` (m × in) and a frozen `w` (out × in), without a weight gradient.
pub fn frozen_matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.apply_op2(&w.t()?, FrozenMatmul)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .and_then(|d| d.abs())
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.max(0))
            .and_then(|d| d.to_dtype(DType::F64))
            .and_then(|d| d.to_scalar::<f64>())
            .expect("same-shape tensors")
    }

    #[test]
    fn forward_and_input_gradient_equal_plain_matmul_and_weight_gets_none() -> Result<()> {
        let dev = Device::Cpu;
        let mut rng = crate::ml::rng::Rng::new(3);
        let x0 = Tensor::from_vec(rng.normal_vec(5 * 7, 1.0), (5, 7), &dev)?;
        let w = Tensor::from_vec(rng.normal_vec(4 * 7, 1.0), (4, 7), &dev)?;
        let up = Tensor::from_vec(rng.normal_vec(5 * 4, 1.0), (5, 4), &dev)?;

        let xv = Var::from_tensor(&x0)?;
        let plain = xv.as_tensor().matmul(&w.t()?)?;
        let g_plain = (&plain * &up)?.sum_all()?.backward()?;

        let xf = Var::from_tensor(&x0)?;
        let frozen = frozen_matmul_t(xf.as_tensor(), &w)?;
        let g_frozen = (&frozen * &up)?.sum_all()?.backward()?;

        assert_eq!(frozen.dims(), &[5, 4]);
        assert!(max_abs_diff(&plain, &frozen) == 0.0, "same GEMM, same bits");
        let gx_plain = g_plain.get(xv.as_tensor()).expect("x has a gradient");
        let gx_frozen = g_frozen.get(xf.as_tensor()).expect("x has a gradient");
        assert!(max_abs_diff(gx_plain, gx_frozen) < 1e-6);

        // The plain matmul leaves a (7, 4) = Wᵀ-shaped gradient behind; the frozen one does not.
        let wt_shaped = |g: &candle_core::backprop::GradStore| {
            g.get_ids()
                .filter_map(|id| g.get_id(*id))
                .filter(|t| t.dims() == [7, 4])
                .count()
        };
        assert_eq!(wt_shaped(&g_plain), 1);
        assert_eq!(wt_shaped(&g_frozen), 0);
        assert!(g_frozen.get(&w).is_none());
        Ok(())
    }
}
