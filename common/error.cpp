#include "common/error.hpp"

namespace mop {

InputError::InputError(const std::string& sentence) : std::runtime_error(sentence) {}

} // namespace mop
