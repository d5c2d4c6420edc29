#!/usr/bin/env python3
"""Writes a C file that embeds the given migration files (in name order)."""
import os
import sys

out = sys.argv[1]
files = sorted(sys.argv[2:], key=os.path.basename)
with open(out, "w") as f:
    f.write('#include "spool/migrate.h"\n\n')
    for i, path in enumerate(files):
        data = open(path, "rb").read()
        f.write("static const char m%d[] = {" % i)
        f.write(",".join(str(b) for b in data) + (",0" if data else "0"))
        f.write("};\n")
    f.write("const struct sp_migration sp_builtin_migrations[] = {\n")
    for i, path in enumerate(files):
        size = os.path.getsize(path)
        f.write('    {"%s", m%d, %d},\n' % (os.path.basename(path), i, size))
    if not files:
        f.write("    {0},\n")
    f.write("};\n")
    f.write("const size_t sp_builtin_migrations_count = %d;\n" % len(files))
