/* oneDNN's GEMM (PyPI's onednn-cpu-gomp) for MLX: a forwarding library, built by
 * nanobert/mlx_cpu.py on first use and cached, as openblas_shim.c.
 *
 * MLX calls the CBLAS cblas_sgemm; oneDNN offers dnnl_sgemm, row-major only, with 'N'/'T'
 * characters and 64-bit sizes. A column-major product C = op(A) op(B) is the row-major
 * C^T = op(B)^T op(A)^T: the same call with A and B (and their sizes) swapped.
 *
 * Threads: oneDNN runs a GEMM on OpenMP threads, as many as the calling thread's OpenMP
 * setting allows. With one MLX stream per core, each stream's thread must ask for one, or
 * two streams x two threads oversubscribe two cores; that setting is per thread, so each
 * calling thread sets it on its first call (and again if onednn_shim_set_num_threads
 * changes the count). 0, the default: OpenMP's own (OMP_NUM_THREADS, else all cores). */

#include <stdint.h>

int dnnl_sgemm(char transa, char transb, int64_t m, int64_t n, int64_t k, float alpha, const float *a, int64_t lda,
               const float *b, int64_t ldb, float beta, float *c, int64_t ldc);
void omp_set_num_threads(int n); /* libgomp's, which libdnnl links */

enum { ROW_MAJOR = 101, TRANS = 112 }; /* CBLAS's CblasRowMajor, CblasTrans */

static int threads;                  /* the count asked for; 0: OpenMP's default */
static __thread int threads_set = 0; /* what this thread last told OpenMP */

void onednn_shim_set_num_threads(int n) { threads = n; }

int onednn_shim_get_num_threads(void) { return threads; }

void cblas_sgemm(int layout, int transa, int transb, int m, int n, int k, float alpha, const float *a, int lda,
                 const float *b, int ldb, float beta, float *c, int ldc) {
    if (threads && threads_set != threads) {
        omp_set_num_threads(threads);
        threads_set = threads;
    }
    char ta = transa == TRANS ? 'T' : 'N', tb = transb == TRANS ? 'T' : 'N';
    if (layout == ROW_MAJOR)
        dnnl_sgemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    else
        dnnl_sgemm(tb, ta, n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
}
