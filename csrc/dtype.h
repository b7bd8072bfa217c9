// Element types, named as safetensors names them.
#pragma once
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

namespace pyconv {

enum class DType : uint8_t {
  BOOL, U8, I8, I16, U16, F16, BF16, I32, U32, F32, F64, I64, U64, F8_E4M3, F8_E5M2
};

std::optional<DType> dtype_from_name(std::string_view name);
const char* dtype_name(DType dtype);
size_t dtype_itemsize(DType dtype);

}  // namespace pyconv
