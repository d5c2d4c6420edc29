/*
 * Starts a cluster and dies without cleaning up (abort). Registered with
 * should_fail: the harness's reaper must still stop the server and remove the
 * directory; tests/harness/leftovers.sh, run last, checks that it did.
 */
#include <stdio.h>
#include <stdlib.h>

#include "pgtest.h"

int main(void)
{
    struct pgt t;
    pgt_start(&t, true);
    PGconn *c = pgt_connect(&t);
    char *v = pgt_scalar(c, "SELECT 42");
    int ok = v && atoi(v) == 42;
    free(v);
    PQfinish(c);
    fprintf(stderr, "cluster at %s answered; now dying without cleanup\n", t.cluster.dir);
    if (!ok)
        return 0; /* a pass here is a failure of this should_fail test */
    abort();
}
