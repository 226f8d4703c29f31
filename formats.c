// formats.c: every byte-level file format casdm reads or writes, behind one
// door. Nothing here knows about models; casdm.c turns the results into
// data sets, checkpoints and messages.
//
// Reads (each from memory, with a file wrapper; each bounds what it
// allocates before it allocates, and returns -1 / NULL with a message naming
// the file instead of exiting, so the fuzz harnesses in tests/fuzz.c can run
// every path):
//   any file     read_file: regular files only, at most a given size
//   PNG          8-bit grey / grey+alpha / RGB / RGBA, every row filter, no
//                interlace, through a small inflate (RFC 1950/1951)
//   PPM / PGM    binary P6 / P5, maxval 255
//   IDX          MNIST-style image files (magic 0x00000803), square images,
//                and label files (0x00000801)
//   CIFAR-10     the binary version: records of 1 label + 3072 bytes
//   safetensors  F32 tensors and a string __metadata__ object
//   log.csv      casdm train's log (step, five loss terms, img/s)
//   NPZ          numpy's zip of .npy members, stored or deflated: samples
//                (uint8) and FID statistics (float32 / float64)
// Writes (atomically: path.tmp, fsync, rename, fsync of the directory):
//   PNG (stored deflate blocks), NPZ (stored zip: arr_0.npy as improved-
//   diffusion's image_sample.py; mu / sigma as pytorch-fid's --save-stats),
//   safetensors, the loss plot SVG.
#define _POSIX_C_SOURCE 200809L
#include "casdm.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

int errorf(char *err, size_t errlen, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
    return -1;
}

static uint32_t be32(const unsigned char *b) {
    return (uint32_t)b[0] << 24 | (uint32_t)b[1] << 16 | (uint32_t)b[2] << 8 | (uint32_t)b[3];
}

// ---------------------------------------------------------------------------
// ---- byte buffers and files ----
// ---------------------------------------------------------------------------
void bytes_put(Bytes *o, const void *p, size_t n) {
    if (n == 0) return;  // memcpy with a NULL source is undefined even for 0 bytes
    if (o->len + n > o->cap) {
        size_t cap = o->cap ? o->cap * 2 : 4096;
        while (cap < o->len + n) cap *= 2;
        unsigned char *nb = mallocCheck(cap);
        if (o->len) memcpy(nb, o->b, o->len);
        free(o->b);
        o->b = nb;
        o->cap = cap;
    }
    memcpy(o->b + o->len, p, n);
    o->len += n;
}

void bytes_printf(Bytes *o, const char *fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (n > 0) bytes_put(o, buf, (size_t)(n < (int)sizeof buf ? n : (int)sizeof buf - 1));
}

static void bytes_u32be(Bytes *o, uint32_t v) {
    unsigned char b[4] = {(unsigned char)(v >> 24), (unsigned char)(v >> 16),
                          (unsigned char)(v >> 8), (unsigned char)v};
    bytes_put(o, b, 4);
}

static void bytes_u16le(Bytes *o, uint32_t v) {
    unsigned char b[2] = {(unsigned char)v, (unsigned char)(v >> 8)};
    bytes_put(o, b, 2);
}

static void bytes_u32le(Bytes *o, uint32_t v) {
    unsigned char b[4] = {(unsigned char)v, (unsigned char)(v >> 8), (unsigned char)(v >> 16),
                          (unsigned char)(v >> 24)};
    bytes_put(o, b, 4);
}

// Opens path for reading after checking that it is a regular file of at most
// max bytes (ftell on a directory gives nonsense sizes). *size: its length.
static FILE *open_regular(const char *path, uint64_t max, uint64_t *size, char *err,
                          size_t errlen) {
    FILE *f = fopen(path, "rb");
    if (!f) { errorf(err, errlen, "cannot open '%s': %s", path, strerror(errno)); return NULL; }
    struct stat st;
    if (fstat(fileno(f), &st) != 0) {
        errorf(err, errlen, "cannot stat '%s': %s", path, strerror(errno));
        fclose(f);
        return NULL;
    }
    if (!S_ISREG(st.st_mode)) {
        errorf(err, errlen, "'%s' is %s, not a file", path,
               S_ISDIR(st.st_mode) ? "a directory" : "not a regular file");
        fclose(f);
        return NULL;
    }
    if ((uint64_t)st.st_size > max) {
        errorf(err, errlen, "'%s' is %llu bytes; the limit for this kind of file is %llu", path,
             (unsigned long long)st.st_size, (unsigned long long)max);
        fclose(f);
        return NULL;
    }
    *size = (uint64_t)st.st_size;
    return f;
}

unsigned char *read_file(const char *path, uint64_t max, size_t *size, char *err, size_t errlen) {
    uint64_t n;
    FILE *f = open_regular(path, max, &n, err, errlen);
    if (!f) return NULL;
    if ((uint64_t)(size_t)n != n) {  // 32-bit hosts
        errorf(err, errlen, "'%s' (%llu bytes) does not fit in this machine's address space", path,
               (unsigned long long)n);
        fclose(f);
        return NULL;
    }
    unsigned char *b = mallocCheck((size_t)n + 1);
    size_t got = fread(b, 1, (size_t)n, f);
    int bad = got != (size_t)n || ferror(f);
    fclose(f);
    if (bad) {
        errorf(err, errlen, "cannot read '%s': %s", path,
               got != (size_t)n ? "the file changed while reading" : strerror(errno));
        free(b);
        return NULL;
    }
    b[n] = 0;
    *size = (size_t)n;
    return b;
}

// fsync of the directory holding path, so that a rename into it survives a
// power loss (a rename is a change of the directory, not of the file)
static void sync_parent_dir(const char *path) {
    char dir[4200];
    const char *slash = strrchr(path, '/');
    if (!slash) snprintf(dir, sizeof dir, ".");
    else if (slash == path) snprintf(dir, sizeof dir, "/");
    else snprintf(dir, sizeof dir, "%.*s", (int)(slash - path), path);
    int fd = open(dir, O_RDONLY);
    if (fd < 0) return;
    fsync(fd);  // best effort: some file systems refuse fsync on directories
    close(fd);
}

int atomic_open(AtomicFile *a, const char *path, char *err, size_t errlen) {
    memset(a, 0, sizeof *a);
    if (snprintf(a->tmp, sizeof a->tmp, "%s.tmp", path) >= (int)sizeof a->tmp)
        return errorf(err, errlen, "'%s': path too long", path);
    snprintf(a->path, sizeof a->path, "%s", path);
    a->f = fopen(a->tmp, "wb");
    if (!a->f) return errorf(err, errlen, "cannot create '%s': %s", a->tmp, strerror(errno));
    a->ok = 1;
    return 0;
}

void atomic_write(AtomicFile *a, const void *p, size_t n) {
    if (a->ok && n && fwrite(p, 1, n, a->f) != n) { a->ok = 0; a->err = errno; }
}

int atomic_commit(AtomicFile *a, char *err, size_t errlen) {
    int ok = a->ok && fflush(a->f) == 0 && fsync(fileno(a->f)) == 0;
    int e = a->ok ? errno : a->err;
    if (fclose(a->f) != 0 && ok) { ok = 0; e = errno; }
    a->f = NULL;
    if (!ok) {
        remove(a->tmp);
        return errorf(err, errlen, "cannot write '%s': %s", a->path, strerror(e ? e : EIO));
    }
    if (rename(a->tmp, a->path) != 0) {
        e = errno;
        remove(a->tmp);
        return errorf(err, errlen, "cannot rename '%s' to '%s': %s", a->tmp, a->path, strerror(e));
    }
    sync_parent_dir(a->path);
    return 0;
}

int write_file_atomically(const char *path, const void *data, size_t len, char *err,
                          size_t errlen) {
    AtomicFile a;
    if (atomic_open(&a, path, err, errlen) != 0) return -1;
    atomic_write(&a, data, len);
    return atomic_commit(&a, err, errlen);
}

// ---------------------------------------------------------------------------
// ---- CRC-32 (PNG chunks, zip) ----
// ---------------------------------------------------------------------------
static uint32_t crc_table[256];

static void crc_init(void) {
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++) c = c & 1 ? 0xedb88320u ^ (c >> 1) : c >> 1;
        crc_table[n] = c;
    }
}

static uint32_t crc32_update(uint32_t crc, const unsigned char *b, size_t n) {
    if (!crc_table[1]) crc_init();
    crc = ~crc;
    for (size_t i = 0; i < n; i++) crc = crc_table[(crc ^ b[i]) & 0xff] ^ (crc >> 8);
    return ~crc;
}

static uint32_t adler32(const unsigned char *b, size_t n) {
    uint32_t a = 1, s = 0;
    for (size_t i = 0; i < n; i++) { a = (a + b[i]) % 65521u; s = (s + a) % 65521u; }
    return (s << 16) | a;
}

// ---------------------------------------------------------------------------
// ---- inflate (RFC 1951) with an output limit ----
// Canonical Huffman codes decoded bit by bit (as zlib's puff.c describes the
// format); the output may not grow past `limit` bytes, so a small file
// cannot expand into gigabytes before its size is checked.
// ---------------------------------------------------------------------------
typedef struct {
    const unsigned char *in;
    size_t len, pos;
    uint32_t bits;
    int nbits;
    Bytes *out;
    size_t limit;
} Inflate;

static int inf_bits(Inflate *s, int n) {  // n bits, LSB first; -1 past the end
    while (s->nbits < n) {
        if (s->pos >= s->len) return -1;
        s->bits |= (uint32_t)s->in[s->pos++] << s->nbits;
        s->nbits += 8;
    }
    int v = (int)(s->bits & ((1u << n) - 1));
    s->bits >>= n;
    s->nbits -= n;
    return v;
}

typedef struct { short count[16], symbol[320]; } Huffman;

static void huff_build(Huffman *h, const unsigned char *lengths, int n) {
    short offs[16];
    memset(h->count, 0, sizeof h->count);
    for (int i = 0; i < n; i++) h->count[lengths[i]]++;
    h->count[0] = 0;
    offs[1] = 0;
    for (int i = 1; i < 15; i++) offs[i + 1] = (short)(offs[i] + h->count[i]);
    for (int i = 0; i < n; i++)
        if (lengths[i]) h->symbol[offs[lengths[i]]++] = (short)i;
}

static int huff_decode(Inflate *s, const Huffman *h) {
    int code = 0, first = 0, index = 0;
    for (int len = 1; len < 16; len++) {
        int b = inf_bits(s, 1);
        if (b < 0) return -1;
        code |= b;
        int count = h->count[len];
        if (code - count < first) return h->symbol[index + (code - first)];
        index += count;
        first = (first + count) << 1;
        code <<= 1;
    }
    return -1;
}

static int inf_put(Inflate *s, const unsigned char *p, size_t n) {
    if (n > s->limit - s->out->len) return -2;  // more data than the image can hold
    bytes_put(s->out, p, n);
    return 0;
}

static const short len_base[29] = {3,  4,  5,  6,  7,  8,  9,  10, 11,  13,  15,  17,  19,  23, 27,
                                   31, 35, 43, 51, 59, 67, 83, 99, 115, 131, 163, 195, 227, 258};
static const short len_extra[29] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2,
                                    2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0};
static const short dist_base[30] = {1,    2,    3,    4,    5,    7,    9,    13,    17,    25,
                                    33,   49,   65,   97,   129,  193,  257,  385,   513,   769,
                                    1025, 1537, 2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577};
static const short dist_extra[30] = {0, 0, 0, 0, 1, 1, 2, 2,  3,  3,  4,  4,  5,  5,  6,
                                     6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13};

static int inf_codes(Inflate *s, const Huffman *lit, const Huffman *dist) {
    for (;;) {
        int sym = huff_decode(s, lit);
        if (sym < 0) return -1;
        if (sym < 256) {
            unsigned char c = (unsigned char)sym;
            if (inf_put(s, &c, 1)) return -2;
            continue;
        }
        if (sym == 256) return 0;
        sym -= 257;
        if (sym >= 29) return -1;
        int e = inf_bits(s, len_extra[sym]);
        if (e < 0) return -1;
        int len = len_base[sym] + e, ds = huff_decode(s, dist);
        if (ds < 0 || ds >= 30) return -1;
        e = inf_bits(s, dist_extra[ds]);
        if (e < 0) return -1;
        size_t d = (size_t)dist_base[ds] + (size_t)e;
        if (d > s->out->len) return -1;
        if ((size_t)len > s->limit - s->out->len) return -2;
        for (int i = 0; i < len; i++) {  // byte by byte: the copy may overlap itself
            unsigned char c = s->out->b[s->out->len - d];
            bytes_put(s->out, &c, 1);
        }
    }
}

// the code lengths of a dynamic block (RFC 1951 3.2.7) into lengths[0..288)
// and lengths[288..318)
static int inf_dynamic_lengths(Inflate *s, unsigned char *lengths, int *ndist_out) {
    static const unsigned char order[19] = {16, 17, 18, 0, 8,  7, 9,  6, 10, 5,
                                            11, 4,  12, 3, 13, 2, 14, 1, 15};
    int nlen = inf_bits(s, 5) + 257, ndist = inf_bits(s, 5) + 1, ncode = inf_bits(s, 4) + 4;
    if (nlen > 286 || ndist > 30 || nlen < 257 || ndist < 1 || ncode < 4) return -1;
    unsigned char cl[19] = {0};
    for (int i = 0; i < ncode; i++) {
        int v = inf_bits(s, 3);
        if (v < 0) return -1;
        cl[order[i]] = (unsigned char)v;
    }
    Huffman lencode;
    huff_build(&lencode, cl, 19);
    for (int i = 0; i < nlen + ndist;) {
        int sym = huff_decode(s, &lencode), rep;
        unsigned char val = 0;
        if (sym < 0) return -1;
        if (sym < 16) { lengths[i++] = (unsigned char)sym; continue; }
        if (sym == 16) {
            if (i == 0) return -1;
            val = lengths[i - 1];
            rep = 3 + inf_bits(s, 2);
        } else if (sym == 17) {
            rep = 3 + inf_bits(s, 3);
        } else {
            rep = 11 + inf_bits(s, 7);
        }
        if (rep < 3 || i + rep > nlen + ndist) return -1;
        while (rep--) lengths[i++] = val;
    }
    memmove(lengths + 288, lengths + nlen, (size_t)ndist);
    for (int i = nlen; i < 288; i++) lengths[i] = 0;
    *ndist_out = ndist;
    return 0;
}

// the deflate blocks of s -> s->out; 0, -1 (corrupt) or -2 (too long)
static int inflate_blocks(Inflate *sp) {
    Inflate s = *sp;
    int last = 0;
    while (!last) {
        last = inf_bits(&s, 1);
        int type = inf_bits(&s, 2);
        if (last < 0 || type < 0) return -1;
        if (type == 0) {  // stored
            s.bits = 0;
            s.nbits = 0;
            if (s.pos + 4 > s.len) return -1;
            unsigned n = s.in[s.pos] | (unsigned)s.in[s.pos + 1] << 8,
                     nn = s.in[s.pos + 2] | (unsigned)s.in[s.pos + 3] << 8;
            s.pos += 4;
            if ((n ^ 0xffffu) != nn || n > s.len - s.pos) return -1;
            if (inf_put(&s, s.in + s.pos, n)) return -2;
            s.pos += n;
        } else if (type == 1 || type == 2) {
            unsigned char lengths[320];
            Huffman lit, dist;
            int ndist = 30;
            if (type == 1) {  // fixed codes
                for (int i = 0; i < 144; i++) lengths[i] = 8;
                for (int i = 144; i < 256; i++) lengths[i] = 9;
                for (int i = 256; i < 280; i++) lengths[i] = 7;
                for (int i = 280; i < 288; i++) lengths[i] = 8;
                for (int i = 0; i < 30; i++) lengths[288 + i] = 5;
            } else if (inf_dynamic_lengths(&s, lengths, &ndist) != 0) {
                return -1;
            }
            huff_build(&lit, lengths, 288);
            huff_build(&dist, lengths + 288, ndist);
            int rc = inf_codes(&s, &lit, &dist);
            if (rc) return rc;
        } else {
            return -1;
        }
    }
    *sp = s;
    return 0;
}

// zlib stream -> out, at most limit bytes; 0, -1 (corrupt) or -2 (too long)
static int inflate_zlib(const unsigned char *in, size_t len, Bytes *out, size_t limit) {
    if (len < 6 || (in[0] & 0x0f) != 8 || ((in[0] << 8) | in[1]) % 31 || (in[1] & 0x20)) return -1;
    Inflate s = {in, len - 4, 2, 0, 0, out, limit};
    int rc = inflate_blocks(&s);
    if (rc) return rc;
    if (adler32(out->b ? out->b : (const unsigned char *)"", out->len) != be32(in + len - 4))
        return -1;
    return 0;
}

// raw deflate (a zip member) -> out, at most limit bytes
static int inflate_raw(const unsigned char *in, size_t len, Bytes *out, size_t limit) {
    Inflate s = {in, len, 0, 0, 0, out, limit};
    return inflate_blocks(&s);
}

// ---------------------------------------------------------------------------
// ---- reading images: PNG and binary PPM/PGM ----
// ---------------------------------------------------------------------------
static int paeth(int a, int b, int c) {
    int p = a + b - c, pa = abs(p - a), pb = abs(p - b), pc = abs(p - c);
    return pa <= pb && pa <= pc ? a : (pb <= pc ? b : c);
}

// (H,W,ch) bytes -> (H,W,oc): grey repeated to RGB, alpha dropped
static unsigned char *convert_channels(const unsigned char *img, size_t pixels, int ch, int oc) {
    unsigned char *out = mallocCheck(pixels * (size_t)oc);
    for (size_t i = 0; i < pixels; i++)
        for (int c = 0; c < oc; c++) out[i * oc + c] = img[i * ch + (ch >= 3 ? c : 0)];
    return out;
}

static int pnm_space(unsigned char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

// one number of a PNM header, after whitespace and comments
static int pnm_number(const unsigned char *b, size_t n, size_t *p, long *v) {
    while (*p < n && (pnm_space(b[*p]) || b[*p] == '#'))
        if (b[(*p)++] == '#') while (*p < n && b[*p] != '\n') (*p)++;
    if (*p >= n || b[*p] < '0' || b[*p] > '9') return -1;
    long x = 0;
    while (*p < n && b[*p] >= '0' && b[*p] <= '9') {
        if (x > IMAGE_MAX_SIDE) return -2;  // stop before the value can overflow
        x = x * 10 + (b[(*p)++] - '0');
    }
    *v = x;
    return 0;
}

static unsigned char *decode_pnm(const unsigned char *b, size_t n, const char *name, int *W, int *H,
                                 int *C, char *err, size_t errlen) {
    int ch = b[1] == '6' ? 3 : 1;
    long v[3];
    size_t p = 2;
    if (n < 3 || !(pnm_space(b[2]) || b[2] == '#')) {
        errorf(err, errlen, "'%s': bad PNM header", name);
        return NULL;
    }
    for (int k = 0; k < 3; k++) {  // width, height, maxval
        int rc = pnm_number(b, n, &p, &v[k]);
        if (rc == -2) {
            errorf(err, errlen, "'%s': PNM header number too large (sides up to %d)", name,
                   IMAGE_MAX_SIDE);
            return NULL;
        }
        if (rc) { errorf(err, errlen, "'%s': bad PNM header", name); return NULL; }
    }
    if (v[2] != 255) {
        errorf(err, errlen, "'%s': only 8-bit PNM (maxval 255) is supported", name);
        return NULL;
    }
    if (v[0] < 1 || v[1] < 1 || v[0] > IMAGE_MAX_SIDE || v[1] > IMAGE_MAX_SIDE) {
        errorf(err, errlen, "'%s': PNM size %ldx%ld is outside 1..%d", name, v[0], v[1],
               IMAGE_MAX_SIDE);
        return NULL;
    }
    // exactly one whitespace byte ends the header
    uint64_t need = (uint64_t)v[0] * (uint64_t)v[1] * (uint64_t)ch;
    if (p < n && !pnm_space(b[p])) {
        errorf(err, errlen, "'%s': bad PNM header (no whitespace after the maxval)", name);
        return NULL;
    }
    if (p >= n || (uint64_t)(n - p - 1) < need) {
        errorf(err, errlen, "'%s': truncated PNM data (%llu pixel bytes wanted)", name,
               (unsigned long long)need);
        return NULL;
    }
    p++;
    *W = (int)v[0];
    *H = (int)v[1];
    int oc = *C ? *C : ch;
    unsigned char *out = convert_channels(b + p, (size_t)need / (size_t)ch, ch, oc);
    *C = oc;
    return out;
}

static int unfilter_rows(unsigned char *img, const unsigned char *raw, int H, size_t stride,
                         int ch) {
    for (int y = 0; y < H; y++) {
        const unsigned char *src = raw + (size_t)y * (stride + 1) + 1;
        unsigned char *row = img + (size_t)y * stride, *up = y ? row - stride : NULL;
        int f = src[-1];
        if (f > 4) return f;
        for (size_t i = 0; i < stride; i++) {
            int a = i >= (size_t)ch ? row[i - ch] : 0, u = up ? up[i] : 0;
            int c = (up && i >= (size_t)ch) ? up[i - ch] : 0, v = 0;
            switch (f) {
            case 0: v = src[i]; break;
            case 1: v = src[i] + a; break;
            case 2: v = src[i] + u; break;
            case 3: v = src[i] + ((a + u) >> 1); break;
            default: v = src[i] + paeth(a, u, c); break;
            }
            row[i] = (unsigned char)v;
        }
    }
    return 0;
}

static unsigned char *decode_png(const unsigned char *b, size_t n, const char *name, int *W, int *H,
                                 int *C, char *err, size_t errlen) {
    Bytes z = {0}, raw = {0};
    unsigned char *img = NULL, *out = NULL;
    size_t p = 8;
    int w = 0, h = 0, depth = 0, ctype = -1, interlace = 0, seen_ihdr = 0;
    while (p + 12 <= n) {
        uint32_t len = be32(b + p);
        if (len > n - p - 12) { errorf(err, errlen, "'%s': truncated PNG chunk", name); goto done; }
        if (crc32_update(0, b + p + 4, len + 4) != be32(b + p + 8 + len)) {
            errorf(err, errlen, "'%s': PNG chunk CRC mismatch", name);
            goto done;
        }
        const unsigned char *d = b + p + 8, *type = b + p + 4;
        if (!seen_ihdr && (memcmp(type, "IHDR", 4) || len != 13)) {
            errorf(err, errlen, "'%s': a PNG must start with a 13-byte IHDR chunk", name);
            goto done;
        }
        if (!memcmp(type, "IHDR", 4)) {
            if (seen_ihdr) { errorf(err, errlen, "'%s': two IHDR chunks", name); goto done; }
            seen_ihdr = 1;
            uint32_t w32 = be32(d), h32 = be32(d + 4);
            w = w32 > IMAGE_MAX_SIDE ? -1 : (int)w32;
            h = h32 > IMAGE_MAX_SIDE ? -1 : (int)h32;
            depth = d[8];
            ctype = d[9];
            interlace = d[12];
        } else if (!memcmp(type, "IDAT", 4)) {
            bytes_put(&z, d, len);
        } else if (!memcmp(type, "IEND", 4)) {
            break;
        }
        p += 12 + len;
    }
    int ch = ctype == 0 ? 1 : ctype == 4 ? 2 : ctype == 2 ? 3 : ctype == 6 ? 4 : 0;
    if (!seen_ihdr || depth != 8 || ch == 0 || interlace) {
        errorf(err, errlen, "'%s': only 8-bit, non-interlaced grey/RGB(A) PNGs are supported",
               name);
        goto done;
    }
    if (w < 1 || h < 1 || (uint64_t)w * (uint64_t)h > IMAGE_MAX_PIXELS) {
        errorf(err, errlen, "'%s': PNG size %dx%d is outside 1..%d per side and %d pixels", name, w,
               h, IMAGE_MAX_SIDE, IMAGE_MAX_PIXELS);
        goto done;
    }
    size_t stride = (size_t)w * ch, want = (size_t)h * (stride + 1);
    int rc = inflate_zlib(z.b, z.len, &raw, want);
    if (rc == -2) {
        errorf(err, errlen, "'%s': PNG image data longer than its %dx%d size", name, w, h);
        goto done;
    }
    if (rc) { errorf(err, errlen, "'%s': corrupt PNG image data", name); goto done; }
    if (raw.len != want) { errorf(err, errlen, "'%s': PNG image data too short", name); goto done; }
    img = mallocCheck((size_t)h * stride);
    int bad = unfilter_rows(img, raw.b, h, stride, ch);
    if (bad) { errorf(err, errlen, "'%s': bad PNG filter type %d", name, bad); goto done; }
    int oc = *C ? *C : ch >= 3 ? 3 : 1;
    out = convert_channels(img, (size_t)w * h, ch, oc);
    *W = w;
    *H = h;
    *C = oc;
done:
    free(img);
    free(raw.b);
    free(z.b);
    return out;
}

unsigned char *decode_image(const unsigned char *b, size_t n, const char *name, int *W, int *H,
                            int *C, char *err, size_t errlen) {
    static const unsigned char sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
    if (*C != 0 && *C != 1 && *C != 3) {
        errorf(err, errlen, "decode_image: channels %d", *C);
        return NULL;
    }
    if (n >= 2 && b[0] == 'P' && (b[1] == '5' || b[1] == '6'))
        return decode_pnm(b, n, name, W, H, C, err, errlen);
    if (n >= 8 && !memcmp(b, sig, 8)) return decode_png(b, n, name, W, H, C, err, errlen);
    errorf(err, errlen, "'%s' is neither a PNG nor a binary PPM/PGM file", name);
    return NULL;
}

unsigned char *read_image(const char *path, int *W, int *H, int *C, char *err, size_t errlen) {
    size_t n;
    unsigned char *b = read_file(path, IMAGE_MAX_FILE, &n, err, errlen);
    if (!b) return NULL;
    unsigned char *img = decode_image(b, n, path, W, H, C, err, errlen);
    free(b);
    return img;
}

// ---------------------------------------------------------------------------
// ---- data set files: IDX and CIFAR-10 binary ----
// ---------------------------------------------------------------------------
// IDX (MNIST / Fashion-MNIST images): magic 0x00000803, then N, rows, cols
// (big-endian), then N*rows*cols bytes. Images are zero-padded to a side that
// is a multiple of 8 (28 -> 32), centred, so that three halvings fit.
int idx_decode(const unsigned char *b, size_t size, const char *name, Images *out, char *err,
               size_t errlen) {
    memset(out, 0, sizeof *out);
    if (size >= 2 && b[0] == 0x1f && b[1] == 0x8b)
        return errorf(err, errlen, "'%s' is gzip-compressed: gunzip it first (make data does)",
                      name);
    if (size < 16 || be32(b) != 0x00000803)
        return errorf(err, errlen, "'%s' is not an IDX image file (magic %08x, want 00000803)",
                      name, size >= 4 ? be32(b) : 0);
    uint32_t n = be32(b + 4), rows = be32(b + 8), cols = be32(b + 12);
    if (rows != cols || rows == 0 || rows > IDX_MAX_SIDE)
        return errorf(err, errlen, "'%s': images are %ux%u; square images of 1..%d pixels only",
                      name, rows, cols, IDX_MAX_SIDE);
    if (n == 0 || n > 0x7fffffffu || (uint64_t)n * rows * cols != size - 16)
        return errorf(err, errlen,
                      "'%s': header says %u images of %ux%u but the file has %zu pixel bytes", name,
                      n, rows, cols, size - 16);
    int side = ((int)rows + 7) / 8 * 8;
    // at most (1 + 7/rows)^2 times the file (64 for 1x1)
    uint64_t bytes = (uint64_t)n * side * side;
    if (bytes > DATA_MAX_FILE || (uint64_t)(size_t)bytes != bytes)
        return errorf(err, errlen, "'%s': %u images padded to %dx%d do not fit in memory", name, n,
                      side, side);
    out->n = (int)n;
    out->c = 1;
    out->h = out->w = side;
    out->pixels = callocCheck((size_t)bytes, 1);
    int o = (side - (int)rows) / 2;
    for (uint32_t i = 0; i < n; i++)
        for (uint32_t y = 0; y < rows; y++)
            memcpy(out->pixels + ((size_t)i * side + o + y) * side + o,
                   b + 16 + ((size_t)i * rows + y) * cols, cols);
    return 0;
}

// IDX labels (MNIST / Fashion-MNIST): magic 0x00000801, then N, then N bytes;
// N must be the number of images already in im
int idx_labels_decode(const unsigned char *b, size_t size, const char *name, Images *im,
                      char *err, size_t errlen) {
    if (size >= 2 && b[0] == 0x1f && b[1] == 0x8b)
        return errorf(err, errlen, "'%s' is gzip-compressed: gunzip it first (make data does)",
                      name);
    if (size < 8 || be32(b) != 0x00000801)
        return errorf(err, errlen, "'%s' is not an IDX label file (magic %08x, want 00000801)",
                      name, size >= 4 ? be32(b) : 0);
    uint32_t n = be32(b + 4);
    if ((uint64_t)n != size - 8)
        return errorf(err, errlen, "'%s': header says %u labels but the file has %zu", name, n,
                      size - 8);
    if (n != (uint32_t)im->n)
        return errorf(err, errlen, "'%s' has %u labels for %d images", name, n, im->n);
    free(im->labels);
    im->labels = mallocCheck(n ? n : 1);
    memcpy(im->labels, b + 8, n);
    return 0;
}

void images_free(Images *im) {
    free(im->pixels);
    free(im->labels);
    memset(im, 0, sizeof *im);
}

// CIFAR-10 binary version: records of 1 label byte + 3072 bytes (R, G, B
// planes of 32x32). Appends to out (c, h, w set to 3, 32, 32).
int cifar_decode(const unsigned char *b, size_t size, const char *name, Images *out, char *err,
                 size_t errlen) {
    const size_t rec = 1 + 3 * 32 * 32;
    if (size == 0 || size % rec)
        return errorf(err, errlen,
                      "'%s' is not a CIFAR-10 binary batch: %zu bytes is not a multiple of %zu "
                      "(1 label + 3072 pixels)",
                      name, size, rec);
    size_t n = size / rec;
    if (n > (size_t)(0x7fffffff - out->n))
        return errorf(err, errlen, "'%s': too many images", name);
    for (size_t i = 0; i < n; i++)
        if (b[i * rec] > 9)
            return errorf(err, errlen, "'%s': record %zu has label %d; CIFAR-10 labels are 0..9",
                          name, i, b[i * rec]);
    unsigned char *p = mallocCheck(((size_t)out->n + n) * 3072);
    unsigned char *l = mallocCheck((size_t)out->n + n);
    if (out->n) memcpy(p, out->pixels, (size_t)out->n * 3072);
    if (out->n && out->labels) memcpy(l, out->labels, (size_t)out->n);
    for (size_t i = 0; i < n; i++) {
        memcpy(p + ((size_t)out->n + i) * 3072, b + i * rec + 1, 3072);
        l[(size_t)out->n + i] = b[i * rec];
    }
    free(out->pixels);
    free(out->labels);
    out->pixels = p;
    out->labels = l;
    out->n += (int)n;
    out->c = 3;
    out->h = out->w = 32;
    return 0;
}

// ---------------------------------------------------------------------------
// ---- writing images: PNG and NPZ, no zlib ----
// PNG (RFC 2083 / ISO 15948): zlib stream of "stored" deflate blocks, so no
// compressor is needed; CRC-32 per chunk, Adler-32 per stream.
// ---------------------------------------------------------------------------
static void png_chunk(Bytes *o, const char *type, const unsigned char *data, size_t n) {
    bytes_u32be(o, (uint32_t)n);
    size_t start = o->len;
    bytes_put(o, type, 4);
    bytes_put(o, data, n);
    bytes_u32be(o, crc32_update(0, o->b + start, n + 4));
}

void png_encode(Bytes *o, const unsigned char *pixels, int W, int H, int C) {
    Bytes raw = {0}, z = {0};
    size_t row = (size_t)W * C;
    for (int y = 0; y < H; y++) {  // filter type 0 on every row
        unsigned char f0 = 0;
        bytes_put(&raw, &f0, 1);
        bytes_put(&raw, pixels + (size_t)y * row, row);
    }
    unsigned char zh[2] = {0x78, 0x01};  // deflate, 32K window, no dictionary, check bits
    bytes_put(&z, zh, 2);
    for (size_t off = 0; off < raw.len || off == 0; off += 65535) {
        size_t n = raw.len - off < 65535 ? raw.len - off : 65535;
        unsigned char hdr[5] = {(unsigned char)(off + n == raw.len), (unsigned char)n,
                                (unsigned char)(n >> 8), (unsigned char)~n,
                                (unsigned char)(~n >> 8)};
        bytes_put(&z, hdr, 5);
        bytes_put(&z, raw.b + off, n);
        if (raw.len == 0) break;
    }
    bytes_u32be(&z, adler32(raw.b ? raw.b : (const unsigned char *)"", raw.len));
    static const unsigned char sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
    bytes_put(o, sig, 8);
    unsigned char ihdr[13] = {(unsigned char)(W >> 24),
                              (unsigned char)(W >> 16),
                              (unsigned char)(W >> 8),
                              (unsigned char)W,
                              (unsigned char)(H >> 24),
                              (unsigned char)(H >> 16),
                              (unsigned char)(H >> 8),
                              (unsigned char)H,
                              8,
                              (unsigned char)(C == 1 ? 0 : 2),
                              0,
                              0,
                              0};
    png_chunk(o, "IHDR", ihdr, 13);
    png_chunk(o, "IDAT", z.b, z.len);
    png_chunk(o, "IEND", NULL, 0);
    free(raw.b);
    free(z.b);
}

int write_png(const char *path, const unsigned char *pixels, int W, int H, int C, char *err,
              size_t errlen) {
    Bytes o = {0};
    png_encode(&o, pixels, W, H, C);
    int rc = write_file_atomically(path, o.b, o.len, err, errlen);
    free(o.b);
    return rc;
}

// ---------------------------------------------------------------------------
// ---- NPZ: numpy's zip of .npy members ----
// Written: stored members (no compression), as improved-diffusion's samples
// (arr_0: uint8 (N,H,W,C)) and pytorch-fid's statistics (mu, sigma: float64).
// Read: stored or deflated members (np.savez / np.savez_compressed), zip64
// sizes in the central directory (numpy writes them), .npy versions 1-3 of
// little-endian uint8, float32 or float64 in C order.
// ---------------------------------------------------------------------------
static const char *npy_descr(int kind) {
    return kind == NPY_U8 ? "|u1" : kind == NPY_F32 ? "<f4" : "<f8";
}
static size_t npy_item(int kind) { return kind == NPY_U8 ? 1 : kind == NPY_F32 ? 4 : 8; }

// one member's .npy bytes: magic, version 1.0, the header dict padded to 64, data
static void npy_encode(Bytes *o, const NpzWrite *a) {
    char dict[512];
    int dl = snprintf(dict, sizeof dict, "{'descr': '%s', 'fortran_order': False, 'shape': (",
                      npy_descr(a->kind));
    for (int d = 0; d < a->ndim; d++)  // numpy's repr of the tuple: "(8,)", "(5, 32, 32, 3)"
        dl += snprintf(dict + dl, sizeof dict - (size_t)dl, "%s%lld", d ? ", " : "",
                       (long long)a->shape[d]);
    dl += snprintf(dict + dl, sizeof dict - (size_t)dl, "%s), }", a->ndim == 1 ? "," : "");
    int total = 10 + dl + 1, padn = (64 - total % 64) % 64;
    static const unsigned char magic[8] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0};
    bytes_put(o, magic, 8);
    bytes_u16le(o, (uint32_t)(dl + padn + 1));
    bytes_put(o, dict, (size_t)dl);
    for (int i = 0; i < padn; i++) bytes_put(o, " ", 1);
    bytes_put(o, "\n", 1);
    size_t count = 1;
    for (int d = 0; d < a->ndim; d++) count *= (size_t)a->shape[d];
    if (a->kind == NPY_U8) { bytes_put(o, a->data, count); return; }
    for (size_t i = 0; i < count; i++) {  // little-endian, whatever the host
        unsigned char b[8];
        if (a->kind == NPY_F32) {
            uint32_t u;
            memcpy(&u, (const float *)a->data + i, 4);
            for (int k = 0; k < 4; k++) b[k] = (unsigned char)(u >> (8 * k));
        } else {
            uint64_t u;
            memcpy(&u, (const double *)a->data + i, 8);
            for (int k = 0; k < 8; k++) b[k] = (unsigned char)(u >> (8 * k));
        }
        bytes_put(o, b, npy_item(a->kind));
    }
}

int npz_write(const char *path, const NpzWrite *arrays, int n, char *err, size_t errlen) {
    Bytes o = {0}, cdir = {0};
    int rc = 0;
    for (int k = 0; k < n && rc == 0; k++) {
        Bytes npy = {0};
        npy_encode(&npy, &arrays[k]);
        char name[80];
        snprintf(name, sizeof name, "%s.npy", arrays[k].name);
        uint16_t nl = (uint16_t)strlen(name);
        if ((uint64_t)o.len + npy.len + 1024 > 0xffffffffu) {
            rc = errorf(err, errlen, "'%s': over 4 GiB is beyond a plain zip (no zip64)", path);
            free(npy.b);
            break;
        }
        uint32_t crc = crc32_update(0, npy.b, npy.len), at = (uint32_t)o.len;
        // local file header: stored (method 0), no data descriptor
        bytes_u32le(&o, 0x04034b50); bytes_u16le(&o, 20); bytes_u16le(&o, 0); bytes_u16le(&o, 0);
        bytes_u16le(&o, 0); bytes_u16le(&o, 0x21);  // time 0, date 1980-01-01
        bytes_u32le(&o, crc); bytes_u32le(&o, (uint32_t)npy.len); bytes_u32le(&o, (uint32_t)npy.len);
        bytes_u16le(&o, nl); bytes_u16le(&o, 0);
        bytes_put(&o, name, nl);
        bytes_put(&o, npy.b, npy.len);
        // its central directory entry
        bytes_u32le(&cdir, 0x02014b50); bytes_u16le(&cdir, 20); bytes_u16le(&cdir, 20);
        bytes_u16le(&cdir, 0); bytes_u16le(&cdir, 0); bytes_u16le(&cdir, 0);
        bytes_u16le(&cdir, 0x21);
        bytes_u32le(&cdir, crc); bytes_u32le(&cdir, (uint32_t)npy.len);
        bytes_u32le(&cdir, (uint32_t)npy.len);
        bytes_u16le(&cdir, nl); bytes_u16le(&cdir, 0); bytes_u16le(&cdir, 0);
        bytes_u16le(&cdir, 0); bytes_u16le(&cdir, 0);
        bytes_u32le(&cdir, 0); bytes_u32le(&cdir, at);  // attributes, local header offset
        bytes_put(&cdir, name, nl);
        free(npy.b);
    }
    if (rc == 0) {
        uint32_t cd = (uint32_t)o.len;
        bytes_put(&o, cdir.b, cdir.len);
        bytes_u32le(&o, 0x06054b50); bytes_u16le(&o, 0); bytes_u16le(&o, 0);
        bytes_u16le(&o, (uint32_t)n); bytes_u16le(&o, (uint32_t)n);
        bytes_u32le(&o, (uint32_t)cdir.len); bytes_u32le(&o, cd); bytes_u16le(&o, 0);
        rc = write_file_atomically(path, o.b, o.len, err, errlen);
    }
    free(o.b);
    free(cdir.b);
    return rc;
}

// NPZ with one member arr_0.npy of uint8 (N, H, W, C)
int write_npz(const char *path, const unsigned char *img, int N, int H, int W, int C, char *err,
              size_t errlen) {
    NpzWrite a = {"arr_0", NPY_U8, 4, {N, H, W, C}, img};
    return npz_write(path, &a, 1, err, errlen);
}

static uint32_t le16(const unsigned char *b) { return (uint32_t)b[0] | (uint32_t)b[1] << 8; }
static uint32_t le32(const unsigned char *b) { return le16(b) | le16(b + 2) << 16; }
static uint64_t le64(const unsigned char *b) { return le32(b) | (uint64_t)le32(b + 4) << 32; }

// The central directory entry of member `want` (e.g. "mu.npy"): its method,
// sizes and local header offset; zip64 extra fields replace 0xffffffff ones.
typedef struct { uint32_t method, crc; uint64_t csize, usize, offset; } ZipMember;

static int zip_find(const unsigned char *b, size_t n, const char *want, ZipMember *m,
                    int *found) {
    *found = 0;
    if (n < 22) return -1;
    size_t eocd = n - 22, stop = n > 22 + 65535 ? n - 22 - 65535 : 0;
    while (le32(b + eocd) != 0x06054b50) {
        if (eocd == stop) return -1;
        eocd--;
    }
    uint32_t entries = le16(b + eocd + 10), cdlen = le32(b + eocd + 12), cd = le32(b + eocd + 16);
    if (cd > eocd || cdlen > eocd - cd) return -1;
    size_t p = cd, end = (size_t)cd + cdlen;
    for (uint32_t e = 0; e < entries; e++) {
        if (end - p < 46 || le32(b + p) != 0x02014b50) return -1;
        uint32_t nl = le16(b + p + 28), xl = le16(b + p + 30), cl = le16(b + p + 32);
        if (end - p - 46 < (size_t)nl + xl + cl) return -1;
        const unsigned char *name = b + p + 46;
        if (nl == strlen(want) && memcmp(name, want, nl) == 0) {
            m->method = le16(b + p + 10);
            m->crc = le32(b + p + 16);
            m->csize = le32(b + p + 20);
            m->usize = le32(b + p + 24);
            m->offset = le32(b + p + 42);
            // zip64 extended information (header 0x0001): the fields that are 0xffffffff, in order
            const unsigned char *x = name + nl, *xe = x + xl;
            while (xe - x >= 4) {
                uint32_t id = le16(x), len = le16(x + 2);
                if ((size_t)(xe - x - 4) < len) return -1;
                if (id == 1) {
                    const unsigned char *f = x + 4, *fe = f + len;
                    uint64_t *fields[3] = {&m->usize, &m->csize, &m->offset};
                    for (int k = 0; k < 3; k++)
                        if (*fields[k] == 0xffffffffu) {
                            if (fe - f < 8) return -1;
                            *fields[k] = le64(f);
                            f += 8;
                        }
                }
                x += 4 + len;
            }
            *found = 1;
            return 0;
        }
        p += 46 + (size_t)nl + xl + cl;
    }
    return 0;
}

// the shape tuple's numbers after "'shape': (" in the header dict
static int npy_shape(const char *h, NpzArray *out) {
    const char *p = strstr(h, "'shape'");
    if (!p || !(p = strchr(p, '('))) return -1;
    p++;
    out->ndim = 0;
    for (;;) {
        while (*p == ' ' || *p == ',') p++;
        if (*p == ')') break;
        if (*p < '0' || *p > '9' || out->ndim == NPZ_MAX_DIMS) return -1;
        uint64_t v = 0;
        while (*p >= '0' && *p <= '9') {
            if (v > ((uint64_t)1 << 40)) return -1;
            v = v * 10 + (uint64_t)(*p++ - '0');
        }
        if (*p == 'L') p++;  // Python 2's long suffix
        out->shape[out->ndim++] = (int64_t)v;
    }
    return 0;
}

// a member's .npy bytes -> out (u8 for uint8, f64 for float32 / float64)
static int npy_decode(const unsigned char *b, size_t n, const char *what, NpzArray *out, char *err,
                      size_t errlen) {
    static const unsigned char magic[6] = {0x93, 'N', 'U', 'M', 'P', 'Y'};
    if (n < 10 || memcmp(b, magic, 6) != 0) return errorf(err, errlen, "%s: not a .npy array", what);
    int major = b[6];
    size_t hl, at;
    if (major == 1) { hl = le16(b + 8); at = 10; }
    else if ((major == 2 || major == 3) && n >= 12) { hl = le32(b + 8); at = 12; }
    else return errorf(err, errlen, "%s: .npy version %d is not supported", what, major);
    if (hl > 65536 || hl > n - at) return errorf(err, errlen, "%s: truncated .npy header", what);
    char h[65537];
    memcpy(h, b + at, hl);
    h[hl] = 0;
    const char *d = strstr(h, "'descr'");
    const char *q = d ? strchr(d + 7, '\'') : NULL;
    if (!q) return errorf(err, errlen, "%s: .npy header without 'descr'", what);
    q++;
    if (strncmp(q, "|u1'", 4) == 0 || strncmp(q, "<u1'", 4) == 0) out->kind = NPY_U8;
    else if (strncmp(q, "<f4'", 4) == 0) out->kind = NPY_F32;
    else if (strncmp(q, "<f8'", 4) == 0) out->kind = NPY_F64;
    else return errorf(err, errlen, "%s: dtype %.8s is not uint8, <f4 or <f8", what, q);
    const char *fo = strstr(h, "'fortran_order'");
    if (!fo || !strstr(fo, "False"))
        return errorf(err, errlen, "%s: Fortran-ordered arrays are not supported", what);
    if (npy_shape(h, out) != 0) return errorf(err, errlen, "%s: bad shape in .npy header", what);
    uint64_t count = 1;
    for (int k = 0; k < out->ndim; k++) {
        if (out->shape[k] != 0 && count > ((uint64_t)1 << 40) / (uint64_t)out->shape[k])
            return errorf(err, errlen, "%s: shape too large", what);
        count *= (uint64_t)out->shape[k];
    }
    size_t item = npy_item(out->kind), data = at + hl;
    if (count > (n - data) / item || count * item != n - data)
        return errorf(err, errlen, "%s: %zu data bytes for %llu elements of %zu bytes", what,
                      n - data, (unsigned long long)count, item);
    out->count = (size_t)count;
    const unsigned char *src = b + data;
    if (out->kind == NPY_U8) {
        out->u8 = mallocCheck(count ? count : 1);
        memcpy(out->u8, src, count);
        return 0;
    }
    out->f64 = mallocCheck((count ? count : 1) * sizeof(double));
    for (size_t i = 0; i < count; i++) {
        if (out->kind == NPY_F32) {
            uint32_t u = le32(src + 4 * i);
            float f;
            memcpy(&f, &u, 4);
            out->f64[i] = f;
        } else {
            uint64_t u = le64(src + 8 * i);
            memcpy(&out->f64[i], &u, 8);
        }
    }
    return 0;
}

int npz_parse(const unsigned char *b, size_t n, const char *name, const char *member,
              NpzArray *out, char *err, size_t errlen) {
    memset(out, 0, sizeof *out);
    char want[80], what[4200];
    snprintf(want, sizeof want, "%s.npy", member);
    snprintf(what, sizeof what, "'%s' member %s", name, member);
    ZipMember m;
    int found;
    if (zip_find(b, n, want, &m, &found) != 0)
        return errorf(err, errlen, "'%s': not a zip archive (npz), or its directory is corrupt",
                      name);
    if (!found) return errorf(err, errlen, "'%s': no array '%s' in the npz", name, member);
    if (m.offset > n || n - m.offset < 30 || le32(b + m.offset) != 0x04034b50)
        return errorf(err, errlen, "%s: bad local header", what);
    uint64_t start = m.offset + 30 + le16(b + m.offset + 26) + le16(b + m.offset + 28);
    if (start > n || m.csize > n - start) return errorf(err, errlen, "%s: truncated", what);
    // no member may expand past the archive's size bound: the caller read the
    // file within a limit, and deflate cannot expand more than 1032:1
    if (m.usize > (uint64_t)1032 * m.csize + 64 || m.usize > DATA_MAX_FILE)
        return errorf(err, errlen, "%s: implausible size %llu", what,
                      (unsigned long long)m.usize);
    Bytes raw = {0};
    const unsigned char *npy = b + start;
    if (m.method == 8) {
        int rc = inflate_raw(b + start, (size_t)m.csize, &raw, (size_t)m.usize);
        if (rc != 0 || raw.len != m.usize) {
            free(raw.b);
            return errorf(err, errlen, "%s: corrupt deflate data", what);
        }
        npy = raw.b;
    } else if (m.method != 0 || m.csize != m.usize) {
        return errorf(err, errlen, "%s: zip method %u is not stored or deflate", what, m.method);
    }
    int rc = 0;
    if (crc32_update(0, npy ? npy : (const unsigned char *)"", (size_t)m.usize) != m.crc)
        rc = errorf(err, errlen, "%s: CRC mismatch", what);
    else
        rc = npy_decode(npy, (size_t)m.usize, what, out, err, errlen);
    free(raw.b);
    return rc;
}

int npz_read(const char *path, const char *member, NpzArray *out, char *err, size_t errlen) {
    size_t n;
    unsigned char *b = read_file(path, DATA_MAX_FILE, &n, err, errlen);
    memset(out, 0, sizeof *out);
    if (!b) return -1;
    int rc = npz_parse(b, n, path, member, out, err, errlen);
    free(b);
    return rc;
}

int npz_has(const char *path, const char *member) {
    size_t n;
    char err[64];
    unsigned char *b = read_file(path, DATA_MAX_FILE, &n, err, sizeof err);
    if (!b) return 0;
    char want[80];
    snprintf(want, sizeof want, "%s.npy", member);
    ZipMember m;
    int found = 0;
    if (zip_find(b, n, want, &m, &found) != 0) found = 0;
    free(b);
    return found;
}

void npz_free(NpzArray *a) {
    free(a->u8);
    free(a->f64);
    memset(a, 0, sizeof *a);
}

// ---------------------------------------------------------------------------
// ---- safetensors ----
// Header: u64 little-endian length, then JSON
//   {"__metadata__": {"k": "v", ...}, "name": {"dtype": "F32", "shape": [..],
//    "data_offsets": [begin, end]}, ...}
// with offsets relative to the end of the header. As the format requires
// (and huggingface/safetensors' validate() checks), the tensors tile the data
// section exactly: no overlaps, no holes, so what is allocated is at most
// what the file holds. All integers and floats are assembled from bytes, so
// the code is the same on big-endian hosts.
// ---------------------------------------------------------------------------
static uint64_t load_u64_le(const unsigned char *b) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | b[i];
    return v;
}

static void store_u64_le(unsigned char *b, uint64_t v) {
    for (int i = 0; i < 8; i++) { b[i] = (unsigned char)(v & 0xff); v >>= 8; }
}

static float load_f32_le(const unsigned char *b) {
    uint32_t u = (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static void store_f32_le(unsigned char *b, float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    b[0] = (unsigned char)u; b[1] = (unsigned char)(u >> 8);
    b[2] = (unsigned char)(u >> 16); b[3] = (unsigned char)(u >> 24);
}

// a small strict JSON reader for the header; errors go to j->err
typedef struct {
    const char *s, *end;
    char *err;
    size_t errlen;
    const char *path;
    const char *start;
} Json;

static int json_fail(Json *j, const char *what) {
    if (j->err && !j->err[0])
        snprintf(j->err, j->errlen, "%s: bad safetensors header at byte %ld: %s", j->path,
                 (long)(j->s - j->start) + 8, what);
    return -1;
}

static void json_ws(Json *j) {
    while (j->s < j->end && (*j->s == ' ' || *j->s == '\t' || *j->s == '\n' || *j->s == '\r'))
        j->s++;
}

static int json_expect(Json *j, char c) {
    json_ws(j);
    if (j->s >= j->end || *j->s != c) {
        char what[32];
        snprintf(what, sizeof what, "expected '%c'", c);
        return json_fail(j, what);
    }
    j->s++;
    return 0;
}

// string into buf (ASCII escapes only; \u escapes become '?')
static int json_string(Json *j, char *buf, size_t cap) {
    if (json_expect(j, '"')) return -1;
    size_t n = 0;
    while (j->s < j->end && *j->s != '"') {
        char c = *j->s++;
        if ((unsigned char)c < 0x20)
            return json_fail(j, "a control character in a string (JSON wants it escaped)");
        if (c == '\\') {
            if (j->s >= j->end) return json_fail(j, "unfinished escape");
            char e = *j->s++;
            switch (e) {
            case 'n': c = '\n'; break;
            case 't': c = '\t'; break;
            case 'r': c = '\r'; break;
            case 'b': c = '\b'; break;
            case 'f': c = '\f'; break;
            case 'u':
                if (j->end - j->s < 4) return json_fail(j, "short \\u escape");
                j->s += 4;
                c = '?';
                break;
            default: c = e; break;  // \" \\ \/
            }
        }
        if (n + 1 >= cap) return json_fail(j, "string too long");
        buf[n++] = c;
    }
    if (j->s >= j->end) return json_fail(j, "unterminated string");
    j->s++;
    buf[n] = 0;
    return 0;
}

static int json_uint(Json *j, uint64_t *v) {
    json_ws(j);
    if (j->s >= j->end || *j->s < '0' || *j->s > '9')
        return json_fail(j, "expected a non-negative integer");
    uint64_t x = 0;
    while (j->s < j->end && *j->s >= '0' && *j->s <= '9') {
        if (x > (UINT64_MAX - 9) / 10) return json_fail(j, "integer too large");
        x = x * 10 + (uint64_t)(*j->s++ - '0');
    }
    *v = x;
    return 0;
}

static int json_peek(Json *j, char c) {
    json_ws(j);
    return j->s < j->end && *j->s == c;
}

// [u, u, ...] into v (at most cap values)
static int json_uint_array(Json *j, uint64_t *v, int cap, int *count) {
    if (json_expect(j, '[')) return -1;
    *count = 0;
    if (json_peek(j, ']')) { j->s++; return 0; }
    for (;;) {
        if (*count >= cap) return json_fail(j, "too many dimensions");
        if (json_uint(j, &v[(*count)++])) return -1;
        if (json_peek(j, ',')) { j->s++; continue; }
        return json_expect(j, ']');
    }
}

void st_free(StFile *f) {
    if (f->e)
        for (size_t i = 0; i < f->count; i++) free(f->e[i].data);
    free(f->e);
    free(f->by_name);
    free(f->metadata_json);
    memset(f, 0, sizeof *f);
}

static const StFile *sort_file;  // qsort has no context argument in C99
static int cmp_by_name(const void *a, const void *b) {
    return strcmp(sort_file->e[*(const size_t *)a].name, sort_file->e[*(const size_t *)b].name);
}

const StEntry *st_find(const StFile *f, const char *name) {
    size_t lo = 0, hi = f->count;  // binary search in the names' sorted order
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(f->e[f->by_name[mid]].name, name);
        if (c == 0) return &f->e[f->by_name[mid]];
        if (c < 0) lo = mid + 1;
        else hi = mid;
    }
    return NULL;
}

int st_meta(const StFile *f, const char *key, char *buf, size_t len) {
    if (!f->metadata_json) return -1;
    char err[64] = "";
    Json j = {
        f->metadata_json, f->metadata_json + strlen(f->metadata_json), err, sizeof err, "metadata",
        f->metadata_json};
    if (json_expect(&j, '{')) return -1;
    if (json_peek(&j, '}')) return -1;
    for (;;) {
        // as large as st_parse_metadata allows: a long key or value elsewhere
        // in the object does not hide the one asked for
        char k[4096], v[4096];
        if (json_string(&j, k, sizeof k) || json_expect(&j, ':') || json_string(&j, v, sizeof v))
            return -1;
        if (strcmp(k, key) == 0) {
            size_t n = strlen(v);
            if (n >= len) return -1;
            memcpy(buf, v, n + 1);
            return 0;
        }
        if (!json_peek(&j, ',')) return -1;
        j.s++;
    }
}

// the "__metadata__" object: string values only; its raw text is kept
static int st_parse_metadata(Json *j, StFile *out) {
    json_ws(j);
    const char *start = j->s;
    char tmp[4096];
    if (json_expect(j, '{')) return -1;
    if (json_peek(j, '}')) j->s++;
    else for (;;) {
            if (json_string(j, tmp, sizeof tmp) || json_expect(j, ':') ||
                json_string(j, tmp, sizeof tmp))
                return -1;
            if (json_peek(j, ',')) {
                j->s++;
                continue; }
        if (json_expect(j, '}')) return -1;
        break;
    }
    free(out->metadata_json);
    out->metadata_json = mallocCheck((size_t)(j->s - start) + 1);
    memcpy(out->metadata_json, start, (size_t)(j->s - start));
    out->metadata_json[j->s - start] = 0;
    return 0;
}

// one tensor's {"dtype", "shape", "data_offsets"} into e and its byte range
static int st_parse_entry(Json *j, StEntry *e, const char *path, uint64_t *range) {
    int have_dtype = 0, have_shape = 0, have_off = 0, nd = 0, no = 0;
    uint64_t dims[8];
    if (json_expect(j, '{')) return -1;
    for (;;) {
        char field[64];
        if (json_string(j, field, sizeof field) || json_expect(j, ':')) return -1;
        if (strcmp(field, "dtype") == 0) {
            char dt[32];
            if (json_string(j, dt, sizeof dt)) return -1;
            if (strcmp(dt, "F32") != 0)
                return errorf(j->err, j->errlen,
                              "%s: tensor '%s' has dtype %s; only F32 is supported", path, e->name,
                              dt);
            have_dtype = 1;
        } else if (strcmp(field, "shape") == 0) {
            if (json_uint_array(j, dims, 8, &nd)) return -1;
            have_shape = 1;
        } else if (strcmp(field, "data_offsets") == 0) {
            if (json_uint_array(j, range, 2, &no)) return -1;
            if (no != 2) return json_fail(j, "data_offsets needs two integers");
            have_off = 1;
        } else {
            return errorf(j->err, j->errlen, "%s: tensor '%s' has an unknown field '%s'", path,
                          e->name, field);
        }
        if (json_peek(j, ',')) { j->s++; continue; }
        if (json_expect(j, '}')) return -1;
        break;
    }
    if (!have_dtype || !have_shape || !have_off)
        return errorf(j->err, j->errlen, "%s: tensor '%s' lacks dtype, shape or data_offsets", path,
                      e->name);
    uint64_t n = 1;
    e->ndim = nd;
    for (int d = 0; d < nd; d++) {
        if (dims[d] > (1u << 30))
            return errorf(j->err, j->errlen, "%s: tensor '%s' dimension too large", path, e->name);
        e->shape[d] = (int)dims[d];
        n *= dims[d];
        if (n > ((uint64_t)1 << 34))
            return errorf(j->err, j->errlen, "%s: tensor '%s' too large", path, e->name);
    }
    if (range[1] < range[0] || range[1] - range[0] != n * 4)
        return errorf(j->err, j->errlen, "%s: tensor '%s' has %llu bytes of data for %llu floats",
                      path, e->name, (unsigned long long)(range[1] - range[0]),
                      (unsigned long long)n);
    if ((uint64_t)(size_t)n != n)
        return errorf(j->err, j->errlen, "%s: tensor '%s' too large for this machine", path,
                      e->name);
    e->size = (size_t)n;
    return 0;
}

static const uint64_t *sort_ranges;
static int cmp_by_begin(const void *a, const void *b) {
    uint64_t x = sort_ranges[2 * *(const size_t *)a], y = sort_ranges[2 * *(const size_t *)b];
    return x < y ? -1 : x > y;
}

// the tensors must tile [0, data_size): sorted by begin, each starts where
// the last ended, and the last ends at the end of the file
static int st_check_tiling(const StFile *out, const uint64_t *ranges, uint64_t data_size,
                           const char *path, char *err, size_t errlen) {
    size_t *order = mallocCheck((out->count ? out->count : 1) * sizeof *order);
    for (size_t i = 0; i < out->count; i++) order[i] = i;
    sort_ranges = ranges;
    qsort(order, out->count, sizeof *order, cmp_by_begin);
    uint64_t at = 0;
    int rc = 0;
    for (size_t k = 0; k < out->count && rc == 0; k++) {
        const uint64_t *r = ranges + 2 * order[k];
        if (r[1] > data_size)
            rc = errorf(err, errlen,
                        "%s: truncated: tensor '%s' ends at byte %llu of a %llu-byte data section",
                        path, out->e[order[k]].name, (unsigned long long)r[1],
                        (unsigned long long)data_size);
        else if (r[0] < at)
            rc = errorf(err, errlen,
                        "%s: tensor '%s' overlaps another tensor's data (bytes %llu..%llu)", path,
                        out->e[order[k]].name, (unsigned long long)r[0], (unsigned long long)r[1]);
        else if (r[0] > at)
            rc = errorf(err, errlen, "%s: bytes %llu..%llu of the data section belong to no tensor",
                        path, (unsigned long long)at, (unsigned long long)r[0]);
        at = r[1];
    }
    if (rc == 0 && at != data_size)
        rc = errorf(err, errlen, "%s: %llu bytes after the last tensor's data", path,
                    (unsigned long long)(data_size - at));
    free(order);
    return rc;
}

// Parses the header hdr[0..hlen) of a file whose data section has data_size
// bytes: entries (without data), sorted name index, byte ranges (2 per entry,
// to be freed by the caller).
static int st_parse_header(const char *path, const char *hdr, uint64_t hlen, uint64_t data_size,
                           StFile *out, uint64_t **ranges_out, char *err, size_t errlen) {
    Json j = {hdr, hdr + hlen, err, errlen, path, hdr};
    size_t cap = 16;
    uint64_t *ranges = mallocCheck(cap * 2 * sizeof *ranges);
    out->e = mallocCheck(cap * sizeof *out->e);
    *ranges_out = NULL;
    if (json_expect(&j, '{')) goto bad;
    if (json_peek(&j, '}')) j.s++;
    else for (;;) {
        char key[256];
        if (json_string(&j, key, sizeof key) || json_expect(&j, ':')) goto bad;
        if (strcmp(key, "__metadata__") == 0) {
            if (st_parse_metadata(&j, out)) goto bad;
        } else {
            if (out->count == ST_MAX_TENSORS) {
                errorf(err, errlen, "%s: more than %d tensors", path, ST_MAX_TENSORS);
                goto bad;
            }
            if (out->count == cap) {
                cap *= 2;
                StEntry *e = mallocCheck(cap * sizeof *e);
                memcpy(e, out->e, out->count * sizeof *e);
                free(out->e);
                out->e = e;
                uint64_t *r = mallocCheck(cap * 2 * sizeof *r);
                memcpy(r, ranges, out->count * 2 * sizeof *r);
                free(ranges);
                ranges = r;
            }
            StEntry *e = &out->e[out->count];
            memset(e, 0, sizeof *e);
            snprintf(e->name, sizeof e->name, "%s", key);
            if (st_parse_entry(&j, e, path, ranges + 2 * out->count)) goto bad;
            out->count++;
        }
        if (json_peek(&j, ',')) { j.s++; continue; }
        if (json_expect(&j, '}')) goto bad;
        break;
    }
    json_ws(&j);
    if (j.s != j.end) { json_fail(&j, "trailing bytes after the header object"); goto bad; }
    if (st_check_tiling(out, ranges, data_size, path, err, errlen)) goto bad;
    out->by_name = mallocCheck((out->count ? out->count : 1) * sizeof *out->by_name);
    for (size_t i = 0; i < out->count; i++) out->by_name[i] = i;
    sort_file = out;
    qsort(out->by_name, out->count, sizeof *out->by_name, cmp_by_name);
    for (size_t i = 1; i < out->count; i++)
        if (strcmp(out->e[out->by_name[i]].name, out->e[out->by_name[i - 1]].name) == 0) {
            errorf(err, errlen, "%s: tensor '%s' appears twice", path,
                   out->e[out->by_name[i]].name);
            goto bad;
        }
    *ranges_out = ranges;
    return 0;
bad:
    free(ranges);
    return -1;
}

// the length word and its checks; *hlen on success
static int st_check_lengths(const char *path, const unsigned char *lenb, uint64_t fsize,
                            uint64_t *hlen, char *err, size_t errlen) {
    if (fsize < 8)
        return errorf(err, errlen, "%s: truncated: %llu bytes, not even a header length", path,
                      (unsigned long long)fsize);
    *hlen = load_u64_le(lenb);
    if (*hlen < 2 || *hlen > fsize - 8 || *hlen > ST_MAX_HEADER)
        return errorf(err, errlen,
                      "%s: not a safetensors file (header length %llu, file size %llu)", path,
                      (unsigned long long)*hlen, (unsigned long long)fsize);
    return 0;
}

static void st_convert(float *dst, const unsigned char *src, size_t n) {
    for (size_t q = 0; q < n; q++) dst[q] = load_f32_le(src + 4 * q);
}

int st_parse(const unsigned char *buf, size_t len, const char *name, StFile *out, char *err,
             size_t errlen) {
    memset(out, 0, sizeof *out);
    err[0] = 0;
    uint64_t hlen, *ranges = NULL;
    if (st_check_lengths(name, buf, len, &hlen, err, errlen)) return -1;
    char *hdr = mallocCheck((size_t)hlen + 1);
    memcpy(hdr, buf + 8, (size_t)hlen);
    hdr[hlen] = 0;
    int rc = st_parse_header(name, hdr, hlen, len - 8 - hlen, out, &ranges, err, errlen);
    free(hdr);
    if (rc) { st_free(out); return -1; }
    for (size_t i = 0; i < out->count; i++) {
        out->e[i].data = mallocCheck((out->e[i].size ? out->e[i].size : 1) * sizeof(float));
        st_convert(out->e[i].data, buf + 8 + hlen + ranges[2 * i], out->e[i].size);
    }
    free(ranges);
    return 0;
}

int st_read(const char *path, StFile *out, char *err, size_t errlen) {
    memset(out, 0, sizeof *out);
    err[0] = 0;
    uint64_t fsize, hlen, *ranges = NULL;
    FILE *f = open_regular(path, UINT64_MAX, &fsize, err, errlen);
    if (!f) return -1;
    char *hdr = NULL;
    unsigned char *buf = NULL, lenb[8] = {0};
    int rc = -1;
    if (fsize >= 8 && fread(lenb, 1, 8, f) != 8) {
        errorf(err, errlen, "%s: cannot read", path);
        goto done;
    }
    if (st_check_lengths(path, lenb, fsize, &hlen, err, errlen)) goto done;
    hdr = mallocCheck((size_t)hlen + 1);
    if (fread(hdr, 1, (size_t)hlen, f) != hlen) {
        errorf(err, errlen, "%s: truncated header", path);
        goto done;
    }
    hdr[hlen] = 0;
    if (st_parse_header(path, hdr, hlen, fsize - 8 - hlen, out, &ranges, err, errlen)) goto done;
    // the data, converted from little-endian
    size_t chunk = 1 << 16;
    buf = mallocCheck(chunk * 4);
    for (size_t i = 0; i < out->count; i++) {
        StEntry *e = &out->e[i];
        e->data = mallocCheck((e->size ? e->size : 1) * sizeof(float));
        if (fseeko(f, (off_t)(8 + hlen + ranges[2 * i]), SEEK_SET) != 0) {
            errorf(err, errlen, "%s: cannot seek to tensor '%s'", path, e->name);
            goto done;
        }
        for (size_t k = 0; k < e->size; k += chunk) {
            size_t m = e->size - k < chunk ? e->size - k : chunk;
            if (fread(buf, 4, m, f) != m) {
                errorf(err, errlen, "%s: truncated while reading tensor '%s'", path, e->name);
                goto done;
            }
            st_convert(e->data + k, buf, m);
        }
    }
    rc = 0;
done:
    if (rc != 0) {
        if (!err[0]) errorf(err, errlen, "%s: cannot read", path);
        st_free(out);
    }
    free(buf);
    free(ranges);
    free(hdr);
    fclose(f);
    return rc;
}

static void json_put_string(Bytes *t, const char *s) {
    bytes_put(t, "\"", 1);
    for (; *s; s++) {
        if (*s == '"' || *s == '\\') bytes_printf(t, "\\%c", *s);
        else if ((unsigned char)*s < 0x20) bytes_printf(t, "\\u%04x", (unsigned)(unsigned char)*s);
        else bytes_put(t, s, 1);
    }
    bytes_put(t, "\"", 1);
}

int st_write(const char *path, const StWrite *t, size_t n, const char *const *metadata,
             char *err, size_t errlen) {
    Bytes h = {0};
    bytes_put(&h, "{", 1);
    int first = 1;
    if (metadata && metadata[0]) {
        bytes_printf(&h, "\"__metadata__\":{");
        for (size_t i = 0; metadata[i]; i += 2) {
            if (i) bytes_put(&h, ",", 1);
            json_put_string(&h, metadata[i]);
            bytes_put(&h, ":", 1);
            json_put_string(&h, metadata[i + 1] ? metadata[i + 1] : "");
            if (!metadata[i + 1]) break;
        }
        bytes_put(&h, "}", 1);
        first = 0;
    }
    uint64_t off = 0;
    for (size_t i = 0; i < n; i++) {
        size_t size = shape_size(t[i].ndim, t[i].shape);
        if (!first) bytes_put(&h, ",", 1);
        first = 0;
        json_put_string(&h, t[i].name);
        bytes_printf(&h, ":{\"dtype\":\"F32\",\"shape\":[");
        for (int d = 0; d < t[i].ndim; d++) bytes_printf(&h, d ? ",%d" : "%d", t[i].shape[d]);
        bytes_printf(&h, "],\"data_offsets\":[%llu,%llu]}", (unsigned long long)off,
                     (unsigned long long)(off + 4 * (uint64_t)size));
        off += 4 * (uint64_t)size;
    }
    bytes_put(&h, "}", 1);
    while ((h.len + 8) % 8) bytes_put(&h, " ", 1);  // spaces keep the data 8-byte aligned

    AtomicFile a;
    if (atomic_open(&a, path, err, errlen) != 0) { free(h.b); return -1; }
    unsigned char lenb[8], *buf = mallocCheck(4 << 16);
    store_u64_le(lenb, h.len);
    atomic_write(&a, lenb, 8);
    atomic_write(&a, h.b, h.len);
    for (size_t i = 0; a.ok && i < n; i++) {
        size_t size = shape_size(t[i].ndim, t[i].shape);
        for (size_t k = 0; a.ok && k < size; k += 1 << 16) {
            size_t m = size - k < (1 << 16) ? size - k : (1 << 16);
            for (size_t q = 0; q < m; q++) store_f32_le(buf + 4 * q, t[i].data[k + q]);
            atomic_write(&a, buf, 4 * m);
        }
    }
    free(buf);
    free(h.b);
    return atomic_commit(&a, err, errlen);
}

// the tensor of f for parameter i, or NULL with the message
static const StEntry *param_entry(const ParamSet *ps, size_t i, const StFile *f, const char *path,
                                  const char *prefix, char *err, size_t errlen) {
    const Tensor *t = &ps->t[i];
    char name[300];
    snprintf(name, sizeof name, "%s%s", prefix, params_name(ps, i));
    const StEntry *e = st_find(f, name);
    if (!e) {
        errorf(err, errlen, "%s: no tensor '%s'", path, name);
        return NULL;
    }
    int same = e->ndim == t->ndim && e->size == t->size;
    for (int d = 0; same && d < t->ndim; d++) same = e->shape[d] == t->shape[d];
    if (!same) {
        char want[64];
        shape_str(t, want, sizeof want);
        errorf(err, errlen, "%s: tensor '%s' has another shape than %s", path, name, want);
        return NULL;
    }
    for (size_t k = 0; k < e->size; k++)
        if (!isfinite(e->data[k])) {
            errorf(err, errlen, "%s: tensor '%s' holds NaN or Inf values", path, name);
            return NULL;
        }
    return e;
}

int params_check_st(const ParamSet *ps, const StFile *f, const char *path, const char *prefix,
                    char *err, size_t errlen) {
    for (size_t i = 0; i < ps->count; i++)
        if (!param_entry(ps, i, f, path, prefix, err, errlen)) return -1;
    return 0;
}

int params_load_st(ParamSet *ps, const StFile *f, const char *path, const char *prefix, char *err,
                   size_t errlen) {
    for (size_t i = 0; i < ps->count; i++) {
        const StEntry *e = param_entry(ps, i, f, path, prefix, err, errlen);
        if (!e) return -1;
        memcpy(ps->t[i].data, e->data, e->size * sizeof(float));
    }
    return 0;
}

int params_st_write(const ParamSet *ps, const char *path, const char *const *metadata, char *err,
                    size_t errlen) {
    StWrite *w = mallocCheck((ps->count ? ps->count : 1) * sizeof *w);
    for (size_t i = 0; i < ps->count; i++) {
        const Tensor *t = &ps->t[i];
        w[i] = (StWrite){t->name, t->ndim, t->shape, t->data};
    }
    int rc = st_write(path, w, ps->count, metadata, err, errlen);
    free(w);
    return rc;
}

// ---------------------------------------------------------------------------
// ---- log.csv and the loss plot ----
// log.csv: "step,loss,l_eps,l_x0,l_mu,l_lpips,img_per_s,fd", one row per
// --log-every steps and per evaluation, empty fields for absent terms (logs
// of older casdm and tools/train_ref.py stop after img_per_s). The plot: an
// SVG with log-scale y, a colour per loss term, a dash pattern per run, and
// below it a linear-scale panel of fd when a run has one.
// ---------------------------------------------------------------------------
void history_add(History *h, long step, const double *v) {
    if (h->n == h->cap) {
        h->cap = h->cap ? 2 * h->cap : 256;
        long *s = mallocCheck(h->cap * sizeof *s);
        double *nv = mallocCheck(h->cap * HISTORY_COLS * sizeof *nv);
        if (h->n) {
            memcpy(s, h->step, h->n * sizeof *s);
            memcpy(nv, h->v, h->n * HISTORY_COLS * sizeof *nv);
        }
        free(h->step);
        free(h->v);
        h->step = s;
        h->v = nv;
    }
    h->step[h->n] = step;
    memcpy(h->v + h->n * HISTORY_COLS, v, HISTORY_COLS * sizeof *v);
    h->n++;
}

void history_free(History *h) {
    free(h->step);
    free(h->v);
    memset(h, 0, sizeof *h);
}

// the step of a row ("123,..."), or -1 when the line is not a data row
long log_row_step(const char *line, size_t len) {
    long step = 0;
    size_t i = 0;
    for (; i < len && line[i] >= '0' && line[i] <= '9'; i++) {
        if (step > (LOG_MAX_STEP - 9) / 10) return -1;
        step = step * 10 + (line[i] - '0');
    }
    return i > 0 && i < len && line[i] == ',' ? step : -1;
}

// one field as a number; NAN when empty or not a number
static double csv_number(const char *p, const char *end) {
    char buf[64];
    size_t n = (size_t)(end - p);
    if (n == 0 || n >= sizeof buf) return NAN;
    memcpy(buf, p, n);
    buf[n] = 0;
    char *e;
    double v = strtod(buf, &e);
    return *e ? NAN : v;
}

const LogLayout log_layout_diffusion = {
    "step,loss,l_eps,l_x0,l_mu,l_lpips,img_per_s,fd",
    {1, 2, 3, 4, 5, 7},
    {"loss", "L_eps", "L_x0", "L_mu", "L_lpips", "FD (eval)"}};
const LogLayout log_layout_ae = {
    "step,loss,l1,lpips,nll,kl,logvar,g_loss,d_weight,d_loss,logits_real,logits_fake,img_per_s,"
    "val_l1,val_lpips",
    {4, 5, 2, 3, 9, 13},
    {"nll", "KL", "L1", "LPIPS", "d_loss", "held-out L1"}};

const LogLayout log_layout_gan = {
    "step,epoch,d_real,d_fake,r1,g_adv,rec,alpha,logit_real,logit_fake,img_per_s",
    {2, 3, 5, 6, 4, 7},
    {"D real", "D fake", "G adv", "L1 rec", "R1", "alpha"}};

#define LOG_MAX_FIELDS 16  // fields a layout may name (0 = the step)

void history_parse(History *h, const char *text, size_t len) {
    const char *p = text, *end = text + len;
    const LogLayout *known[2] = {&log_layout_ae, &log_layout_gan};
    for (int k = 0; k < 2 && !h->layout; k++) {
        size_t hl = strlen(known[k]->header);
        if (len >= hl && memcmp(text, known[k]->header, hl) == 0) h->layout = known[k];
    }
    if (!h->layout) h->layout = &log_layout_diffusion;
    while (p < end) {
        const char *nl = memchr(p, '\n', (size_t)(end - p)), *le = nl ? nl : end;
        long step = log_row_step(p, (size_t)(le - p));
        if (step >= 0) {
            double field[LOG_MAX_FIELDS];  // field[k]: the k-th after the step's
            const char *f = memchr(p, ',', (size_t)(le - p));
            field[0] = (double)step;
            for (int i = 1; i < LOG_MAX_FIELDS; i++) {
                if (!f) { field[i] = NAN; continue; }
                const char *fe = memchr(f + 1, ',', (size_t)(le - f - 1));
                field[i] = csv_number(f + 1, fe ? fe : le);
                f = fe;
            }
            double v[HISTORY_COLS];
            for (int i = 0; i < HISTORY_COLS; i++) v[i] = field[h->layout->fields[i]];
            history_add(h, step, v);
        }
        p = nl ? nl + 1 : end;  // not le + 1: no pointer past the end
    }
}

int history_load(History *h, const char *path, char *err, size_t errlen) {
    size_t n;
    char *text = (char *)read_file(path, LOG_MAX_FILE, &n, err, errlen);
    if (!text) return -1;
    history_parse(h, text, n);
    free(text);
    return 0;
}

static void svg_text_escaped(Bytes *o, const char *s) {
    for (; *s; s++) {
        if (*s == '<') bytes_printf(o, "&lt;");
        else if (*s == '>') bytes_printf(o, "&gt;");
        else if (*s == '&') bytes_printf(o, "&amp;");
        else bytes_put(o, s, 1);
    }
}

// The panel of fd under the loss panel, for the runs that have one: linear
// y from 0 to a round value above the largest fd, a marked point per
// evaluation, each run in its dash pattern. x as in the loss panel.
typedef struct { double left, right, top, bottom, s0, s1; } PlotBox;

static double plot_x(const PlotBox *b, long step) {
    return b->left + (b->right - b->left) * ((double)step - b->s0) / (b->s1 - b->s0);
}

static void fd_panel(Bytes *o, const History *runs, int nruns, const char *const *dashes,
                     const PlotBox *b, const char *name) {
    static const char color[] = "#ff7f0e";
    double hi = 0;
    for (int r = 0; r < nruns; r++)
        for (size_t i = 0; i < runs[r].n; i++) {
            double v = runs[r].v[i * HISTORY_COLS + HISTORY_FD];
            if (isfinite(v) && v > hi) hi = v;
        }
    if (!(hi > 0)) hi = 1;
    double mag = pow(10.0, floor(log10(hi))), ymax = 10 * mag;  // 1, 2, 5 or 10 x 10^k
    if (hi <= 5 * mag) ymax = 5 * mag;
    if (hi <= 2 * mag) ymax = 2 * mag;
    if (hi <= mag) ymax = mag;
    for (int k = 0; k <= 4; k++) {
        double y = b->bottom - (b->bottom - b->top) * k / 4.0;
        bytes_printf(o,
                     "<line x1=\"%.0f\" y1=\"%.1f\" x2=\"%.0f\" y2=\"%.1f\" stroke=\"#ddd\"/>"
                     "<text x=\"%.0f\" y=\"%.1f\" text-anchor=\"end\">%g</text>\n",
                     b->left, y, b->right, y, b->left - 6, y + 4, ymax * k / 4.0);
    }
    for (int k = 0; k <= 4; k++)
        bytes_printf(o, "<text x=\"%.1f\" y=\"%.0f\" text-anchor=\"middle\">%.0f</text>\n",
                     b->left + (b->right - b->left) * k / 4.0, b->bottom + 18,
                     floor(b->s0 + (b->s1 - b->s0) * k / 4.0));
    bytes_printf(
        o,
        "<rect x=\"%.0f\" y=\"%.0f\" width=\"%.0f\" height=\"%.0f\" fill=\"none\" stroke=\"#444\"/>\n",
        b->left, b->top, b->right - b->left, b->bottom - b->top);
    for (int r = 0; r < nruns; r++) {
        const History *h = &runs[r];
        Bytes dots = {0};
        int any = 0;
        for (size_t i = 0; i < h->n; i++) {
            double v = h->v[i * HISTORY_COLS + HISTORY_FD];
            if (!isfinite(v)) continue;
            double x = plot_x(b, h->step[i]), y = b->bottom - (b->bottom - b->top) * v / ymax;
            if (!any)
                bytes_printf(o, "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"1.5\"%s%s%s points=\"",
                             color, r ? " stroke-dasharray=\"" : "", dashes[r % 4], r ? "\"" : "");
            bytes_printf(o, "%.1f,%.1f ", x, y);
            bytes_printf(&dots, "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"3\" fill=\"%s\"/>", x, y, color);
            any = 1;
        }
        if (any) {
            bytes_printf(o, "\"/>\n");
            bytes_put(o, dots.b, dots.len);
            bytes_printf(o, "\n");
        }
        free(dots.b);
    }
    double y = b->top + 14;
    bytes_printf(o,
                 "<line x1=\"%.0f\" y1=\"%.0f\" x2=\"%.0f\" y2=\"%.0f\" stroke=\"%s\" stroke-width=\"2\"/>"
                 "<text x=\"%.0f\" y=\"%.0f\">%s</text>\n",
                 b->right + 12, y, b->right + 32, y, color, b->right + 38, y + 4, name);
}

// One or more runs in one plot (labels name the runs; NULL for a single run).
// Steps are mapped to x in double: a log may hold any step up to LOG_MAX_STEP.
void loss_svg(Bytes *o, const History *runs, const char *const *labels, int nruns,
              const char *title) {
    const LogLayout *layout = nruns > 0 && runs[0].layout ? runs[0].layout : &log_layout_diffusion;
    const char *const *names = layout->names;
    static const char *colors[PLOT_TERMS] = {"#000000", "#1f77b4", "#d62728", "#2ca02c", "#9467bd"};
    static const char *dashes[4] = {"", "7,4", "2,3", "10,3,2,3"};
    const double W = 800, H = 420, L = 70, R = 170, T = 40, B = 50, H_FD = 200;
    double lo = INFINITY, hi = -INFINITY, s0 = INFINITY, s1 = -INFINITY;
    int has_fd = 0;
    for (int r = 0; r < nruns; r++) {
        const History *h = &runs[r];
        for (size_t i = 0; i < h->n; i++) {
            s0 = fmin(s0, (double)h->step[i]);
            s1 = fmax(s1, (double)h->step[i]);
            has_fd |= isfinite(h->v[i * HISTORY_COLS + HISTORY_FD]);
        }
        for (size_t i = 0; i < h->n; i++)
            for (int t = 0; t < PLOT_TERMS; t++) {
                double v = h->v[i * HISTORY_COLS + t];
                if (v > 0 && isfinite(v)) {
                    lo = fmin(lo, v);
                    hi = fmax(hi, v);
                }
            }
    }
    if (!(s0 <= s1)) { s0 = 0; s1 = 1; }
    if (!(lo < hi)) { lo = 1e-3; hi = 1.0; }
    double dlo = floor(log10(lo)), dhi = ceil(log10(hi));
    if (dhi <= dlo) dhi = dlo + 1;
    if (s1 <= s0) s1 = s0 + 1;
    bytes_printf(
        o,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" font-family=\"sans-serif\" "
        "font-size=\"12\">\n",
        W, H + (has_fd ? H_FD : 0));
    bytes_printf(
        o,
        "<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n<text x=\"%.0f\" y=\"24\" font-size=\"15\">",
        L);
    svg_text_escaped(o, title);
    bytes_printf(o, "</text>\n");
    for (double d = dlo; d <= dhi; d++) {  // decades
        double y = T + (H - T - B) * (dhi - d) / (dhi - dlo);
        bytes_printf(o,
                     "<line x1=\"%.0f\" y1=\"%.1f\" x2=\"%.0f\" y2=\"%.1f\" stroke=\"#ddd\"/>"
                     "<text x=\"%.0f\" y=\"%.1f\" text-anchor=\"end\">1e%d</text>\n",
                     L, y, W - R, y, L - 6, y + 4, (int)d);
    }
    for (int k = 0; k <= 4; k++) {
        double x = L + (W - L - R) * k / 4.0;
        bytes_printf(o, "<text x=\"%.1f\" y=\"%.0f\" text-anchor=\"middle\">%.0f</text>\n", x,
                     H - B + 18, floor(s0 + (s1 - s0) * k / 4.0));
    }
    bytes_printf(o, "<text x=\"%.0f\" y=\"%.0f\" text-anchor=\"middle\">step</text>\n",
                 (L + W - R) / 2, H - 10);
    bytes_printf(
        o,
        "<rect x=\"%.0f\" y=\"%.0f\" width=\"%.0f\" height=\"%.0f\" fill=\"none\" stroke=\"#444\"/>\n",
        L, T, W - L - R, H - T - B);
    int legend = 0;
    for (int t = 0; t < PLOT_TERMS; t++) {
        int shown = 0;
        for (int r = 0; r < nruns; r++) {
            const History *h = &runs[r];
            int any = 0;
            for (size_t i = 0; i < h->n; i++) {
                double v = h->v[i * HISTORY_COLS + t];
                if (!(v > 0) || !isfinite(v)) continue;
                double x = L + (W - L - R) * ((double)h->step[i] - s0) / (s1 - s0);
                double y = T + (H - T - B) * (dhi - log10(v)) / (dhi - dlo);
                if (!any)
                    bytes_printf(
                        o,
                        "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"1.5\"%s%s%s points=\"",
                        colors[t], r ? " stroke-dasharray=\"" : "", dashes[r % 4], r ? "\"" : "");
                bytes_printf(o, "%.1f,%.1f ", x, y);
                any = 1;
            }
            if (any) bytes_printf(o, "\"/>\n");
            shown |= any;
        }
        if (shown) {
            double y = T + 14 + 18 * legend++;
            bytes_printf(
                o,
                "<line x1=\"%.0f\" y1=\"%.0f\" x2=\"%.0f\" y2=\"%.0f\" stroke=\"%s\" stroke-width=\"2\"/>"
                "<text x=\"%.0f\" y=\"%.0f\">%s</text>\n",
                W - R + 12, y, W - R + 32, y, colors[t], W - R + 38, y + 4, names[t]);
        }
    }
    if (has_fd) {
        PlotBox box = {L, W - R, H, H + H_FD - B, s0, s1};
        fd_panel(o, runs, nruns, dashes, &box, names[HISTORY_FD]);
    }
    for (int r = 0; labels && r < nruns; r++) {  // which dash is which run
        double y = T + 14 + 18 * legend++ + 8;
        bytes_printf(
            o,
            "<line x1=\"%.0f\" y1=\"%.0f\" x2=\"%.0f\" y2=\"%.0f\" stroke=\"#444\" stroke-width=\"2\"%s%s%s/>",
            W - R + 12, y, W - R + 32, y, r ? " stroke-dasharray=\"" : "", dashes[r % 4],
            r ? "\"" : "");
        bytes_printf(o, "<text x=\"%.0f\" y=\"%.0f\">", W - R + 38, y + 4);
        svg_text_escaped(o, labels[r]);  // the label is user text
        bytes_printf(o, "</text>\n");
    }
    bytes_printf(o, "</svg>\n");
}

int write_loss_svg(const char *path, const History *runs, const char *const *labels, int nruns,
                   const char *title, char *err, size_t errlen) {
    Bytes o = {0};
    loss_svg(&o, runs, labels, nruns, title);
    int rc = write_file_atomically(path, o.b, o.len, err, errlen);
    free(o.b);
    return rc;
}
