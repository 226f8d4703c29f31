// check_files.c: validates the PNG and NPZ files casdm writes, with code of
// its own (bitwise CRC-32, no table; its own zip and npy parsing), so a bug in
// the writer is not mirrored by the check; and makes the damaged and hostile
// files that tests/test_cli.sh feeds to casdm. Usage:
//   check_files grid.png W H C     check_files samples.npz N H W C
//     prints nothing and exits 0 when the file is valid, else says why, exit 1
//   check_files --set-meta IN OUT KEY VALUE     a checkpoint with one metadata value changed
//   check_files --set-floats IN OUT NAME VALUE  ... with every float of tensor NAME set (strtof:
//   nan, 3e38) check_files --same-tensor A B NAME [NAME_B]  exit 0 when tensor NAME of A has the
//   bytes of NAME (or NAME_B) of B, check_files --craft KIND OUT                a hostile file: png-empty-idat (a valid
//   2x2 grey PNG
//     with an empty IDAT chunk and an empty stored block), png-bomb (a 1x1 PNG whose IDAT inflates
//     to 1 MiB)
#include <math.h>
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

static uint32_t be32(const unsigned char *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static uint32_t le32(const unsigned char *p) {
    return (uint32_t)p[3] << 24 | (uint32_t)p[2] << 16 | (uint32_t)p[1] << 8 | p[0];
}
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
        if (crc32_bitwise(buf + pos + 4, n + 4) != be32(buf + pos + 8 + n))
            return fail("chunk CRC");
        const unsigned char *d = buf + pos + 8;
        if (!memcmp(buf + pos + 4, "IHDR", 4)) {
            if (n != 13 || (int)be32(d) != W || (int)be32(d + 4) != H || d[8] != 8 ||
                d[9] != (C == 1 ? 0 : 2))
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
    if (le32(cd) != 0x02014b50 || le16(cd + 10) != 0)
        return fail("central directory entry / not stored");
    uint32_t crc = le32(cd + 16), size = le32(cd + 20), nl = le16(cd + 28), lo = le32(cd + 42);
    if (nl != 9 || memcmp(cd + 46, "arr_0.npy", 9)) return fail("member name");
    const unsigned char *lh = buf + lo;
    if (le32(lh) != 0x04034b50 || le32(lh + 14) != crc || le32(lh + 18) != size)
        return fail("local header");
    const unsigned char *npy = lh + 30 + le16(lh + 26) + le16(lh + 28);
    if ((size_t)(npy - buf) + size > cdoff) return fail("member size");
    if (crc32_bitwise(npy, size) != crc) return fail("member CRC");
    if (memcmp(npy, "\x93NUMPY\x01\x00", 8)) return fail("npy magic/version");
    uint32_t hl = le16(npy + 8);
    char hdr[512], want[256];
    if (hl >= sizeof hdr || (10 + hl) % 16 || npy[10 + hl - 1] != '\n')
        return fail("npy header length/alignment");
    memcpy(hdr, npy + 10, hl);
    hdr[hl] = 0;
    snprintf(want, sizeof want,
             "{'descr': '|u1', 'fortran_order': False, 'shape': (%d, %d, %d, %d), }", N, H, W, C);
    if (strncmp(hdr, want, strlen(want))) return fail("npy header dict");
    if (size != 10 + hl + (size_t)N * H * W * C) return fail("npy data size");
    return 0;
}

// ---- editing safetensors files (the header is JSON after an 8-byte LE length) ----
static uint64_t le64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = v << 8 | p[i];
    return v;
}

static int write_out(const char *path, const unsigned char *a, size_t na, const unsigned char *b,
                     size_t nb, const unsigned char *c, size_t nc) {
    FILE *f = fopen(path, "wb");
    if (!f) return fail("cannot create the output");
    int ok = fwrite(a, 1, na, f) == na && (!nb || fwrite(b, 1, nb, f) == nb) &&
             (!nc || fwrite(c, 1, nc, f) == nc);
    return fclose(f) == 0 && ok ? 0 : fail("write");
}

// "KEY":"old" -> "KEY":"VALUE" in the header, with the length word updated
static int set_meta(const char *out, const char *key, const char *value) {
    if (len < 8) return fail("not a safetensors file");
    uint64_t hl = le64(buf);
    if (hl > len - 8) return fail("header length");
    char pat[256];
    snprintf(pat, sizeof pat, "\"%s\":\"", key);
    char *hdr = (char *)buf + 8, *at = NULL;
    for (size_t i = 0; i + strlen(pat) <= hl && !at; i++)
        if (!memcmp(hdr + i, pat, strlen(pat))) at = hdr + i + strlen(pat);
    if (!at) return fail("no such metadata key");
    char *end = memchr(at, '"', (size_t)(hdr + hl - at));
    if (!end) return fail("unterminated value");
    size_t vl = strlen(value), nhl = hl - (size_t)(end - at) + vl;
    unsigned char *nh = malloc(8 + nhl);
    for (int i = 0; i < 8; i++) nh[i] = (unsigned char)((uint64_t)nhl >> (8 * i));
    size_t pre = (size_t)(at - hdr);
    memcpy(nh + 8, hdr, pre);
    memcpy(nh + 8 + pre, value, vl);
    memcpy(nh + 8 + pre + vl, end, (size_t)(hdr + hl - end));
    int rc = write_out(out, nh, 8 + nhl, buf + 8 + hl, len - 8 - hl, NULL, 0);
    free(nh);
    return rc;
}

// every float of tensor NAME := value (little-endian)
static int set_floats(const char *out, const char *name, float value) {
    uint64_t hl = le64(buf);
    char pat[400];
    snprintf(pat, sizeof pat, "\"%s\":{", name);
    char *hdr = (char *)buf + 8, *at = NULL;
    for (size_t i = 0; i + strlen(pat) <= hl && !at; i++)
        if (!memcmp(hdr + i, pat, strlen(pat))) at = hdr + i;
    if (!at) return fail("no such tensor");
    char *off = strstr(at, "\"data_offsets\":[");
    unsigned long long b0, b1;
    if (!off || sscanf(off + 16, "%llu,%llu", &b0, &b1) != 2 || 8 + hl + b1 > len)
        return fail("data_offsets");
    uint32_t u;
    memcpy(&u, &value, 4);
    for (unsigned long long p = b0; p < b1; p += 4)
        for (int k = 0; k < 4; k++) buf[8 + hl + p + k] = (unsigned char)(u >> (8 * k));
    return write_out(out, buf, len, NULL, 0, NULL, 0);
}

// ---- hostile PNGs ----
static void put32be(unsigned char *p, uint32_t v) {
    p[0] = v >> 24;
    p[1] = v >> 16;
    p[2] = v >> 8;
    p[3] = (unsigned char)v;
}

static size_t chunk(unsigned char *o, const char *type, const unsigned char *d, uint32_t n) {
    put32be(o, n);
    memcpy(o + 4, type, 4);
    if (n) memcpy(o + 8, d, n);
    put32be(o + 8 + n, crc32_bitwise(o + 4, n + 4));
    return 12 + n;
}

static uint32_t adler(const unsigned char *p, size_t n, uint32_t a, uint32_t b) {
    for (size_t i = 0; i < n; i++) { a = (a + p[i]) % 65521u; b = (b + a) % 65521u; }
    return b << 16 | a;
}

// fixed-Huffman bits, LSB first; Huffman codes go in MSB first (RFC 1951 3.1.1)
typedef struct { unsigned char *o; size_t n; int bit; } Bits;
static void bits_put(Bits *w, uint32_t v, int nbits, int reversed) {
    for (int i = 0; i < nbits; i++) {
        int b = reversed ? (v >> (nbits - 1 - i)) & 1 : (v >> i) & 1;
        if (w->bit == 0) w->o[w->n++] = 0;
        w->o[w->n - 1] |= (unsigned char)(b << w->bit);
        w->bit = (w->bit + 1) & 7;
    }
}

static int craft(const char *kind, const char *out) {
    static const unsigned char sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
    unsigned char *o = calloc(1, 1 << 16), ihdr[13] = {0, 0, 0, 2, 0, 0, 0, 2, 8, 0, 0, 0, 0},
                  z[16384];
    size_t n = 8, zn = 0;
    memcpy(o, sig, 8);
    if (!strcmp(kind, "png-empty-idat")) {
        // rows "0 10 20", "0 30 40" (filter 0): an empty IDAT first, then a
        // zlib stream with an empty stored block before the data block
        const unsigned char raw[6] = {0, 10, 20, 0, 30, 40};
        z[zn++] = 0x78; z[zn++] = 0x01;
        // stored, not last, 0 bytes
        z[zn++] = 0; z[zn++] = 0; z[zn++] = 0; z[zn++] = 0xff; z[zn++] = 0xff;
        // stored, last, 6 bytes
        z[zn++] = 1; z[zn++] = 6; z[zn++] = 0; z[zn++] = 0xf9; z[zn++] = 0xff;
        memcpy(z + zn, raw, 6); zn += 6;
        put32be(z + zn, adler(raw, 6, 1, 0)); zn += 4;
        n += chunk(o + n, "IHDR", ihdr, 13);
        n += chunk(o + n, "IDAT", NULL, 0);
        n += chunk(o + n, "IDAT", z, (uint32_t)zn);
    } else if (!strcmp(kind, "png-bomb")) {
        // 1x1 grey: 2 bytes of image data, but the stream holds 1 MiB of
        // zeros (a literal 0, then length-258 copies at distance 1)
        ihdr[3] = ihdr[7] = 1;
        Bits w = {z + 2, 0, 0};
        z[0] = 0x78; z[1] = 0x01;
        size_t total = 1 << 20, made = 1;
        bits_put(&w, 1, 1, 0);                // last block
        bits_put(&w, 1, 2, 0);                // fixed Huffman
        bits_put(&w, 0x30, 8, 1);             // literal 0
        for (; made + 258 <= total; made += 258) {
            bits_put(&w, 0xc5, 8, 1);         // length symbol 285 (258)
            bits_put(&w, 0, 5, 1);            // distance code 0 (1)
        }
        bits_put(&w, 0, 7, 1);                // end of block
        zn = 2 + w.n;
        uint32_t a = 1, b = 0;
        for (size_t i = 0; i < made; i++) { b = (b + a) % 65521u; }  // adler32 of zeros: a stays 1
        put32be(z + zn, b << 16 | a); zn += 4;
        n += chunk(o + n, "IHDR", ihdr, 13);
        n += chunk(o + n, "IDAT", z, (uint32_t)zn);
    } else {
        free(o);
        return fail("unknown --craft kind");
    }
    n += chunk(o + n, "IEND", NULL, 0);
    int rc = write_out(out, o, n, NULL, 0, NULL, 0);
    free(o);
    return rc;
}

// the whole file into buf (NUL-terminated), len
static int load(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return fail("cannot open");
    fseek(f, 0, SEEK_END);
    len = (size_t)ftell(f);
    rewind(f);
    buf = malloc(len + 1);
    if (fread(buf, 1, len, f) != len) return fail("read");
    fclose(f);
    buf[len] = 0;
    return 0;
}

// tensor name's bytes in the safetensors file in buf: *at, *n; 0, or 1 with a message
static int tensor_bytes(const char *name, const unsigned char **at, size_t *n) {
    if (len < 8) return fail("not a safetensors file");
    uint64_t hl = le64(buf);
    if (hl > len - 8) return fail("header length");
    char pat[400];
    snprintf(pat, sizeof pat, "\"%s\":{", name);
    const char *hdr = (const char *)buf + 8, *t = NULL;
    for (size_t i = 0; i + strlen(pat) <= hl && !t; i++)
        if (!memcmp(hdr + i, pat, strlen(pat))) t = hdr + i;
    if (!t) return fail("no such tensor");
    const char *off = strstr(t, "\"data_offsets\":[");
    unsigned long long b0, b1;
    if (!off || sscanf(off + 16, "%llu,%llu", &b0, &b1) != 2 || b0 > b1 || b1 > len - 8 - hl)
        return fail("data_offsets");
    *at = buf + 8 + hl + b0;
    *n = (size_t)(b1 - b0);
    return 0;
}

// *copy (malloc'd, na bytes): the bytes of tensor `name` in the safetensors
// file `path` (buf is free again after)
static int tensor_copy(const char *path, const char *name, unsigned char **copy, size_t *na) {
    if (load(path)) return 1;
    const unsigned char *pa;
    if (tensor_bytes(name, &pa, na)) { free(buf); return 1; }
    *copy = malloc(*na ? *na : 1);
    if (!*copy) { free(buf); return fail("out of memory"); }
    memcpy(*copy, pa, *na);
    free(buf);
    return 0;
}

static int same_tensor(const char *a, const char *b, const char *name, const char *name_b) {
    unsigned char *copy;
    size_t na;
    if (tensor_copy(a, name, &copy, &na)) return 1;
    if (load(b)) { free(copy); return 1; }
    const unsigned char *pb;
    size_t nb;
    int rc = tensor_bytes(name_b, &pb, &nb);
    if (!rc && (na != nb || memcmp(copy, pb, na))) rc = fail("the tensors differ");
    free(copy);
    free(buf);
    return rc;
}

// --close A B NAME RTOL: the float32 tensor NAME of A and of B differ by at
// most RTOL in relative L2 norm, |a - b| / |b| (printed)
static int close_tensor(const char *a, const char *b, const char *name, double rtol) {
    unsigned char *copy;
    size_t na;
    if (tensor_copy(a, name, &copy, &na)) return 1;
    if (load(b)) { free(copy); return 1; }
    const unsigned char *pb;
    size_t nb;
    int rc = tensor_bytes(name, &pb, &nb);
    if (!rc && na != nb) rc = fail("the tensors' sizes differ");
    double d2 = 0, b2 = 0;
    for (size_t i = 0; !rc && i + 4 <= na; i += 4) {
        float x, y;  // (little-endian files on a little-endian test machine)
        memcpy(&x, copy + i, 4);
        memcpy(&y, pb + i, 4);
        d2 += ((double)x - y) * ((double)x - y);
        b2 += (double)y * y;
    }
    if (!rc) {
        double rel = b2 > 0 ? sqrt(d2 / b2) : sqrt(d2);
        printf("%s: relative difference %.3g\n", name, rel);
        if (!(rel <= rtol)) rc = fail("the tensors differ by more than the tolerance");
    }
    free(copy);
    free(buf);
    return rc;
}

int main(int argc, char **argv) {
    if (argc == 4 && !strcmp(argv[1], "--craft")) return craft(argv[2], argv[3]);
    if (argc == 6 && !strcmp(argv[1], "--close"))
        return close_tensor(argv[2], argv[3], argv[4], strtod(argv[5], NULL));
    if ((argc == 5 || argc == 6) && !strcmp(argv[1], "--same-tensor"))
        return same_tensor(argv[2], argv[3], argv[4], argv[argc == 6 ? 5 : 4]);
    if (argc == 6 && (!strcmp(argv[1], "--set-meta") || !strcmp(argv[1], "--set-floats"))) {
        if (load(argv[2])) return 1;
        int rc = argv[1][6] == 'm' ? set_meta(argv[3], argv[4], argv[5])
                                   : set_floats(argv[3], argv[4], strtof(argv[5], NULL));
        free(buf);
        return rc;
    }
    if (argc < 2) return fail("usage");
    if (load(argv[1])) return 1;
    size_t n = strlen(argv[1]);
    int rc;
    if (n > 4 && !strcmp(argv[1] + n - 4, ".png") && argc == 5)
        rc = check_png(atoi(argv[2]), atoi(argv[3]), atoi(argv[4]));
    else if (n > 4 && !strcmp(argv[1] + n - 4, ".npz") && argc == 6)
        rc = check_npz(atoi(argv[2]), atoi(argv[3]), atoi(argv[4]), atoi(argv[5]));
    else rc = fail("usage: check_files FILE.png W H C | FILE.npz N H W C");
    free(buf);
    return rc;
}
