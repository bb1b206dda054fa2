/* The OpenBLAS from PyPI (scipy-openblas32) for MLX: a forwarding library, built by
 * nanobert/mlx_cpu.py on first use and cached.
 *
 * scipy-openblas32 prefixes every symbol (scipy_cblas_sgemm, ...) so that it can never
 * interpose on another BLAS by accident; MLX calls the unprefixed cblas_sgemm. This file
 * defines the few names MLX and nanobert call, each forwarding to the prefixed one, and is
 * linked against libscipy_openblas.so (found through its rpath). Loaded with RTLD_GLOBAL
 * before MLX, its cblas_sgemm is the one MLX's calls resolve to. */

void scipy_cblas_sgemm(int layout, int transa, int transb, int m, int n, int k, float alpha, const float *a,
                       int lda, const float *b, int ldb, float beta, float *c, int ldc);
void scipy_cblas_dgemm(int layout, int transa, int transb, int m, int n, int k, double alpha, const double *a,
                       int lda, const double *b, int ldb, double beta, double *c, int ldc);
void scipy_cblas_cgemm(int layout, int transa, int transb, int m, int n, int k, const void *alpha, const void *a,
                       int lda, const void *b, int ldb, const void *beta, void *c, int ldc);
void scipy_openblas_set_num_threads(int n);
int scipy_openblas_get_num_threads(void);
char *scipy_openblas_get_corename(void);

void cblas_sgemm(int layout, int transa, int transb, int m, int n, int k, float alpha, const float *a, int lda,
                 const float *b, int ldb, float beta, float *c, int ldc) {
    scipy_cblas_sgemm(layout, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void cblas_dgemm(int layout, int transa, int transb, int m, int n, int k, double alpha, const double *a, int lda,
                 const double *b, int ldb, double beta, double *c, int ldc) {
    scipy_cblas_dgemm(layout, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void cblas_cgemm(int layout, int transa, int transb, int m, int n, int k, const void *alpha, const void *a, int lda,
                 const void *b, int ldb, const void *beta, void *c, int ldc) {
    scipy_cblas_cgemm(layout, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void openblas_set_num_threads(int n) { scipy_openblas_set_num_threads(n); }

int openblas_get_num_threads(void) { return scipy_openblas_get_num_threads(); }

char *openblas_get_corename(void) { return scipy_openblas_get_corename(); }
