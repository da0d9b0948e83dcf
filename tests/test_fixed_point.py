"""Fixed-point conversion and arithmetic are exact and deterministic."""

from fractions import Fraction

import jax.numpy as jnp
import numpy as np
import pytest

from revoptax import Fixed, FixedPointFormat

FMT = FixedPointFormat()


def as_int(x: Fixed):
  return [int(h) * 2**32 + int(lo) for h, lo in zip(np.ravel(x.hi), np.ravel(x.lo))]


def round_half_even(q: Fraction) -> int:
  f = q.numerator // q.denominator
  rem = q - f
  if rem > Fraction(1, 2) or (rem == Fraction(1, 2) and f % 2 == 1):
    f += 1
  return f


def correctly_rounded(k: int, radix_bits: int, mantissa_bits: int) -> float:
  """The float nearest k * 2**-radix_bits with `mantissa_bits` significant bits."""
  if k == 0:
    return 0.0
  mag = abs(k)
  shift = max(mag.bit_length() - mantissa_bits, 0)
  t = round_half_even(Fraction(mag, 2**shift))
  value = float(Fraction(t * 2**shift, 2**radix_bits))
  return -value if k < 0 else value


def sample_floats(rng, n):
  mags = 10.0 ** rng.uniform(-12, 4, size=n)
  x = (mags * rng.choice([-1, 1], size=n)).astype(np.float32)
  specials = np.array([0.0, -0.0, 1.0, -1.0, 2.0**-46, 3 * 2.0**-47, 65535.99, -65535.99])
  return np.concatenate([x, specials.astype(np.float32)])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_from_float_is_exact_round_half_even(dtype):
  rng = np.random.default_rng(0)
  x = jnp.asarray(sample_floats(rng, 2000)).astype(dtype)
  x = x[jnp.isfinite(x) & (jnp.abs(x.astype(jnp.float32)) < 65536)]
  fixed, ok = FMT.from_float(x)
  assert bool(ok.all())
  expected = [round_half_even(Fraction(float(v)) * 2**46) for v in np.asarray(x, np.float64)]
  assert as_int(fixed) == expected


@pytest.mark.parametrize(
  "dtype,mantissa", [(jnp.float32, 24), (jnp.bfloat16, 8), (jnp.float16, 11)]
)
def test_to_float_is_correctly_rounded(dtype, mantissa):
  rng = np.random.default_rng(1)
  ks = [int(v) for v in rng.integers(-(2**61), 2**61, size=500)]
  ks += [int(v) for v in rng.integers(-(2**40), 2**40, size=500)]
  # Exact ties between two floats, both parities.
  ks += [(2**24 + 1) * 2**20 + 2**19, (2**24 + 2) * 2**20 + 2**19, -((2**24 + 1) * 2**20 + 2**19)]
  ks += [0, 1, -1, 2**62 - 1, -(2**62)]
  # Just off a tie, where rounding through float64 first would land on the tie
  # (the float32 path rounds to odd in float64 for exactly these).
  for p in (8, 11, 24):
    for significand in (2 ** (p - 1) + 1, 2 ** (p - 1) + 2, 2**p - 1):  # p significant bits
      tie = (2 * significand + 1) << (61 - p)  # below 2**62
      ks += [sign * (tie + d) for sign in (1, -1) for d in (1, -1, 255, -255, 256)]
  hi = np.array([k >> 32 for k in ks], np.int32)
  lo = np.array([k & 0xFFFFFFFF for k in ks], np.uint32)
  got = np.asarray(FMT.to_float(Fixed(jnp.asarray(hi), jnp.asarray(lo)), dtype), np.float64)
  want = np.array([correctly_rounded(k, 46, mantissa) for k in ks])
  if dtype == jnp.float16:  # float16 overflows above 65504 and is subnormal below 2**-14
    keep = (np.abs(want) < 65504) & (np.abs(want) >= 2.0**-14)
    got, want = got[keep], want[keep]
  np.testing.assert_array_equal(got, want.astype(np.dtype(dtype)).astype(np.float64))


def test_float32_round_trip_is_identity_where_representable():
  rng = np.random.default_rng(2)
  x = sample_floats(rng, 5000)
  x = x[np.abs(x) >= 2.0**-22]  # 24 significant bits fit above 2**-22 at radix 2**-46
  fixed, _ = FMT.from_float(jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(FMT.to_float(fixed)), x)


def test_add_and_sub_are_exact_integer_arithmetic():
  rng = np.random.default_rng(3)
  a_int = [int(v) for v in rng.integers(-(2**61), 2**61, size=300)]
  b_int = [int(v) for v in rng.integers(-(2**61), 2**61, size=300)]

  def fixed(ks):
    return Fixed(
      jnp.asarray(np.array([k >> 32 for k in ks], np.int32)),
      jnp.asarray(np.array([k & 0xFFFFFFFF for k in ks], np.uint32)),
    )

  a, b = fixed(a_int), fixed(b_int)
  assert as_int(FMT.add(a, b)) == [x + y for x, y in zip(a_int, b_int)]
  assert as_int(FMT.sub(a, b)) == [x - y for x, y in zip(a_int, b_int)]


def test_range_and_non_finite_values_are_detected():
  x = jnp.asarray([1.0, 65535.0, 65536.0, -65536.0, jnp.inf, jnp.nan, -1e30], jnp.float32)
  _, ok = FMT.from_float(x)
  assert np.asarray(ok).tolist() == [True, True, False, False, False, False, False]
  big, _ = FMT.from_float(jnp.asarray([60000.0]))
  assert bool(FMT.in_range(big).all())
  assert not bool(FMT.in_range(FMT.add(big, big)).all())


def test_range_boundaries_are_exact():
  """``|x| < 2**int_bits`` exactly: the largest and smallest representable steps at both ends."""
  limit = 2 ** (FMT.int_bits + FMT.radix_bits)
  ks = [limit - 1, limit, -(limit - 1), -limit, 0]
  x = Fixed(
    jnp.asarray(np.array([k >> 32 for k in ks], np.int32)),
    jnp.asarray(np.array([k & 0xFFFFFFFF for k in ks], np.uint32)),
  )
  assert np.asarray(FMT.in_range(x)).tolist() == [True, False, True, False, True]


def test_format_validation():
  with pytest.raises(ValueError, match="exceeds 62"):
    FixedPointFormat(radix_bits=50, int_bits=20)
  fmt = FixedPointFormat(radix_bits=40, int_bits=20)
  assert fmt.resolution == 2.0**-40 and fmt.max_abs == 2.0**20


def test_float16_subnormals_are_rounded_once():
  # Below 2**-14 float16 is subnormal (spacing 2**-24); NumPy's float64 -> float16
  # conversion is correctly rounded, and k * 2**-46 is exact in float64 here.
  rng = np.random.default_rng(4)
  ks = [int(v) for v in rng.integers(-(2**33), 2**33, size=2000)]
  ks += [3 * 2**21, 5 * 2**21, 2**21, -(3 * 2**21)]  # exact ties at the subnormal spacing
  hi = np.array([k >> 32 for k in ks], np.int32)
  lo = np.array([k & 0xFFFFFFFF for k in ks], np.uint32)
  got = np.asarray(FMT.to_float(Fixed(jnp.asarray(hi), jnp.asarray(lo)), jnp.float16))
  want = np.array([k * 2.0**-46 for k in ks]).astype(np.float16)
  np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))


def _float32_by_rounding_to_odd(ks: np.ndarray) -> np.ndarray:
  """``k * 2**-46`` to float32 through float64 rounded to odd (Boldo & Melquiond 2008)."""
  f = ks.astype(np.float64)
  residual = ks - f.astype(np.int64)  # exact: |k| < 2**62
  bits = f.view(np.int64)
  away = (residual > 0) == (ks > 0)
  bits = np.where((residual != 0) & ((bits & 1) == 0), bits + np.where(away, 1, -1), bits)
  return (bits.view(np.float64) * 2.0**-46).astype(np.float32)


def test_float32_conversion_agrees_with_rounding_to_odd_on_a_million_values():
  rng = np.random.default_rng(5)
  parts = [rng.integers(-(2 ** (b - 1)), 2 ** (b - 1), 8000, dtype=np.int64) for b in range(1, 63)]
  # Ties between two float32 neighbours, and one unit either side, at every shift.
  m = rng.integers(2**23, 2**24, 4000, dtype=np.int64)
  for s in range(1, 38):
    tie = (m << s) + (1 << (s - 1))
    parts += [sign * (tie + d) for sign in (1, -1) for d in (-1, 0, 1)]
  ks = np.concatenate(parts)
  hi, lo = (ks >> 32).astype(np.int32), (ks & 0xFFFFFFFF).astype(np.uint32)
  got = np.asarray(FMT.to_float(Fixed(jnp.asarray(hi), jnp.asarray(lo)), jnp.float32))
  np.testing.assert_array_equal(
    got.view(np.uint32), _float32_by_rounding_to_odd(ks).view(np.uint32)
  )
