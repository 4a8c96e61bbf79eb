// Deliberately broken kernels for checking the host SIMT emulator itself (fault_probes.cpp).
#pragma once

#include <string>
#include <vector>

namespace simt {

std::vector<std::string> fault_probe_names();
// Runs one probe: "ok" (no fault, correct data), "wrong data" (no fault, but the kernel read what it should
// not have), or the launch error "<cudaError name>: <message>". Throws std::invalid_argument for an unknown name.
std::string fault_probe(const std::string& name);

}  // namespace simt
