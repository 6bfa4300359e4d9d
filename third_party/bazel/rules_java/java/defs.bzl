"""The rules that @bazel_tools loads from @rules_java//java:defs.bzl, forwarded to Bazel's native rules.

Bazel 4.2.3 fetches rules_java from the network only to re-export its built-in Java rules; this
repository answers those loads offline. twins_tf builds no Java: nothing here is exercised beyond
loading @bazel_tools' own BUILD files.
"""

def java_binary(**attrs):
    native.java_binary(**attrs)

def java_import(**attrs):
    native.java_import(**attrs)

def java_library(**attrs):
    native.java_library(**attrs)

def java_proto_library(**attrs):
    native.java_proto_library(**attrs)

def java_runtime(**attrs):
    native.java_runtime(**attrs)

def java_test(**attrs):
    native.java_test(**attrs)

def java_toolchain(**attrs):
    native.java_toolchain(**attrs)
