#!/bin/sh
# Stands in for Bazel's downloadable coverage tools, which cannot be fetched offline.
echo "bazel coverage is not available offline in twins_tf: run the suite with `make test` instead" >&2
exit 1
