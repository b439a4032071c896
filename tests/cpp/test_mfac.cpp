// M-FAC math shared by host and device (csrc/mfac/mfac.h): bfloat16 conversions and x + wd * p (common add_mul).
#include <cstdint>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <limits>

#include "check.h"
#include "mfac/mfac.h"

using namespace lossforge::mfac;

static uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

static float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

int main() {
  // exactly representable values survive the round trip
  for (float x : {0.0f, -0.0f, 1.0f, -2.5f, 0.15625f, 65536.0f, -1e-30f}) {
    const float y = bf16_to_float(float_to_bf16(x));
    if (bits(x) & 0xffffu) continue;  // not a bfloat16 value: skip (checked below)
    CHECK(bits(y) == bits(x));
  }
  // round to nearest, ties to even, on the 16 dropped bits
  CHECK(float_to_bf16(from_bits(0x3f808000u)) == 0x3f80);  // tie, even below: down
  CHECK(float_to_bf16(from_bits(0x3f818000u)) == 0x3f82);  // tie, odd below: up
  CHECK(float_to_bf16(from_bits(0x3f808001u)) == 0x3f81);  // above the tie: up
  CHECK(float_to_bf16(from_bits(0x3f807fffu)) == 0x3f80);  // below the tie: down
  // overflow to infinity, infinities and NaN
  const float inf = std::numeric_limits<float>::infinity();
  CHECK(float_to_bf16(from_bits(0x7f7fffffu)) == 0x7f80);  // FLT_MAX rounds to +inf
  CHECK(float_to_bf16(inf) == 0x7f80 && float_to_bf16(-inf) == 0xff80);
  CHECK(std::isnan(bf16_to_float(float_to_bf16(std::nanf("")))));
  CHECK(std::isnan(bf16_to_float(float_to_bf16(from_bits(0x7f800001u)))));  // a NaN whose payload rounds away
  // the value of a number once stored, for each storage type
  CHECK(stored(1.00390625f, static_cast<const float*>(nullptr)) == 1.00390625f);
  CHECK(stored(1.00390625f, static_cast<const uint16_t*>(nullptr)) == 1.0f);  // 1 + 2^-8: a tie, to even
  CHECK(stored(0.1, static_cast<const double*>(nullptr)) == 0.1);
  // x + wd * p is a multiply, then an add, each rounded, as in torch (no FMA): with a = 1 + 2^-12,
  // a * a = 1 + 2^-11 + 2^-24 rounds (a tie, to even) to 1 + 2^-11, which the add cancels exactly; one
  // FMA would return 2^-24
  volatile float a = 1.0f + 1.0f / 4096.0f, x = -(1.0f + 1.0f / 2048.0f);  // volatile: computed at run time
  CHECK(lossforge::add_mul(x, a, a) == 0.0f);
  CHECK(lossforge::add_mul(0.5, 0.25, 3.0) == 1.25);
  if (failures() == 0) std::printf("test_mfac: all checks passed\n");
  return failures();
}
