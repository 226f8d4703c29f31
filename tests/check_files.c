// check_files.c: validates the PNG and NPZ files casdm writes, with code of
// its own (bitwise CRC-32, no table; its own zip and npy parsing), so a bug in
// the writer is not mirrored by the check. Usage:
//   check_files grid.png W H C     check_files samples.npz N H W C
// Prints nothing and exits 0 when the file is valid, else says why, exit 1.
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static unsigned char *buf;
static size_t len;

static int fail(const char *why) { fprintf(stderr, "invalid: %s\n", why); return 1; }

static uint32_t crc32_bitwise(const unsigned char *p, size_t n) {
    uint32_t c = 0xffffffffu;
    for (size_t i = 0; i < n; i++) {
        c ^= p[i];
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0xedb88320u & (0u - (c & 1u)));
    }
    return ~c;
}

static uint32_t be32(const unsigned char *p) { return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3]; }
static uint32_t le32(const unsigned char *p) { return (uint32_t)p[3] << 24 | (uint32_t)p[2] << 16 | (uint32_t)p[1] << 8 | p[0]; }
static uint32_t le16(const unsigned char *p) { return (uint32_t)p[1] << 8 | p[0]; }

static int check_png(int W, int H, int C) {
    static const unsigned char sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
    if (len < 8 || memcmp(buf, sig, 8)) return fail("PNG signature");
    size_t pos = 8, zlen = 0;
    unsigned char *z = malloc(len);
    int seen_ihdr = 0, seen_iend = 0;
    while (pos + 12 <= len) {
        uint32_t n = be32(buf + pos);
        if (pos + 12 + n > len) return fail("chunk runs past the end");
        if (crc32_bitwise(buf + pos + 4, n + 4) != be32(buf + pos + 8 + n)) return fail("chunk CRC");
        const unsigned char *d = buf + pos + 8;
        if (!memcmp(buf + pos + 4, "IHDR", 4)) {
            if (n != 13 || (int)be32(d) != W || (int)be32(d + 4) != H || d[8] != 8 || d[9] != (C == 1 ? 0 : 2))
                return fail("IHDR size, depth or colour type");
            seen_ihdr = 1;
        } else if (!memcmp(buf + pos + 4, "IDAT", 4)) {
            memcpy(z + zlen, d, n);
            zlen += n;
        } else if (!memcmp(buf + pos + 4, "IEND", 4)) {
            seen_iend = 1;
        }
        pos += 12 + n;
    }
    if (!seen_ihdr || !seen_iend || pos != len) return fail("chunk sequence");
    // zlib: header, stored deflate blocks only, Adler-32
    if (zlen < 6 || (z[0] & 0x0f) != 8 || ((z[0] << 8) | z[1]) % 31) return fail("zlib header");
    size_t zp = 2, out = 0, want = (size_t)H * (1 + (size_t)W * C);
    unsigned char *raw = malloc(want + 65536);
    int last = 0;
    while (!last) {
        if (zp + 5 > zlen) return fail("deflate block header");
        last = z[zp] & 1;
        if ((z[zp] >> 1) & 3) return fail("not a stored block");
        uint32_t n = le16(z + zp + 1), nn = le16(z + zp + 3);
        if ((n ^ 0xffffu) != nn) return fail("stored block NLEN");
        if (zp + 5 + n > zlen || out + n > want) return fail("stored block size");
        memcpy(raw + out, z + zp + 5, n);
        out += n;
        zp += 5 + n;
    }
    if (out != want) return fail("image data size");
    uint32_t a = 1, b = 0;
    for (size_t i = 0; i < out; i++) { a = (a + raw[i]) % 65521; b = (b + a) % 65521; }
    if (zp + 4 != zlen || be32(z + zp) != ((b << 16) | a)) return fail("Adler-32");
    for (int y = 0; y < H; y++)
        if (raw[(size_t)y * (1 + (size_t)W * C)] != 0) return fail("row filter type");
    free(raw);
    free(z);
    return 0;
}

static int check_npz(int N, int H, int W, int C) {
    // end of central directory: the last 22 bytes (no comment)
    if (len < 22) return fail("too short for a zip");
    const unsigned char *e = buf + len - 22;
    if (le32(e) != 0x06054b50 || le16(e + 10) != 1) return fail("zip end record or entry count");
    uint32_t cdoff = le32(e + 16), cdlen = le32(e + 12);
    if ((size_t)cdoff + cdlen + 22 != len) return fail("central directory position");
    const unsigned char *cd = buf + cdoff;
    if (le32(cd) != 0x02014b50 || le16(cd + 10) != 0) return fail("central directory entry / not stored");
    uint32_t crc = le32(cd + 16), size = le32(cd + 20), nl = le16(cd + 28), lo = le32(cd + 42);
    if (nl != 9 || memcmp(cd + 46, "arr_0.npy", 9)) return fail("member name");
    const unsigned char *lh = buf + lo;
    if (le32(lh) != 0x04034b50 || le32(lh + 14) != crc || le32(lh + 18) != size) return fail("local header");
    const unsigned char *npy = lh + 30 + le16(lh + 26) + le16(lh + 28);
    if ((size_t)(npy - buf) + size > cdoff) return fail("member size");
    if (crc32_bitwise(npy, size) != crc) return fail("member CRC");
    if (memcmp(npy, "\x93NUMPY\x01\x00", 8)) return fail("npy magic/version");
    uint32_t hl = le16(npy + 8);
    char hdr[512], want[256];
    if (hl >= sizeof hdr || (10 + hl) % 16 || npy[10 + hl - 1] != '\n') return fail("npy header length/alignment");
    memcpy(hdr, npy + 10, hl);
    hdr[hl] = 0;
    snprintf(want, sizeof want, "{'descr': '|u1', 'fortran_order': False, 'shape': (%d, %d, %d, %d), }", N, H, W, C);
    if (strncmp(hdr, want, strlen(want))) return fail("npy header dict");
    if (size != 10 + hl + (size_t)N * H * W * C) return fail("npy data size");
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) return fail("usage");
    FILE *f = fopen(argv[1], "rb");
    if (!f) return fail("cannot open");
    fseek(f, 0, SEEK_END);
    len = (size_t)ftell(f);
    rewind(f);
    buf = malloc(len + 1);
    if (fread(buf, 1, len, f) != len) return fail("read");
    fclose(f);
    size_t n = strlen(argv[1]);
    int rc;
    if (n > 4 && !strcmp(argv[1] + n - 4, ".png") && argc == 5) rc = check_png(atoi(argv[2]), atoi(argv[3]), atoi(argv[4]));
    else if (n > 4 && !strcmp(argv[1] + n - 4, ".npz") && argc == 6) rc = check_npz(atoi(argv[2]), atoi(argv[3]), atoi(argv[4]), atoi(argv[5]));
    else rc = fail("usage: check_files FILE.png W H C | FILE.npz N H W C");
    free(buf);
    return rc;
}
