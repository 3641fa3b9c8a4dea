// Filled in by the teacher_targets op (see docs/ARCHITECTURE.md).
#include "common.h"

namespace distill_engine {
void register_teacher_targets(pybind11::module_& m) { (void)m; }
}  // namespace distill_engine
