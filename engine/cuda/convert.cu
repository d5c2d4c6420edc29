// Number conversions for loading weights (host code).
#include "host.h"

#include <string.h>

extern "C" uint16_t se__cu_f32_to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((u >> 16) | 0x40); // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);         // round to nearest even
    return (uint16_t)(u >> 16);
}

extern "C" float se__cu_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, ex = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
    if (ex == 0) {
        if (man == 0) {
            u = sign;
        } else { // subnormal: normalise
            ex = 127 - 15 + 1;
            while (!(man & 0x400u)) {
                man <<= 1;
                ex--;
            }
            u = sign | (ex << 23) | ((man & 0x3ffu) << 13);
        }
    } else if (ex == 31) {
        u = sign | 0x7f800000u | (man << 13);
    } else {
        u = sign | ((ex - 15 + 127) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}
