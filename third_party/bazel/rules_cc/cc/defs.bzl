"""The rules that @bazel_tools loads from @rules_cc//cc:defs.bzl, forwarded to Bazel's native rules.

Bazel 4.2.3 fetches rules_cc from the network only to re-export its built-in C++ rules; this
repository answers those loads offline. twins_tf builds no C++: nothing here is exercised beyond
loading @bazel_tools' own BUILD files.
"""

def cc_binary(**attrs):
    native.cc_binary(**attrs)

def cc_import(**attrs):
    native.cc_import(**attrs)

def cc_library(**attrs):
    native.cc_library(**attrs)

def cc_proto_library(**attrs):
    native.cc_proto_library(**attrs)

def cc_test(**attrs):
    native.cc_test(**attrs)

def cc_toolchain(**attrs):
    native.cc_toolchain(**attrs)

def cc_toolchain_suite(**attrs):
    native.cc_toolchain_suite(**attrs)

def objc_library(**attrs):
    native.objc_library(**attrs)
