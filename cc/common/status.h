// Status and StatusOr: how everything in cc/ and cuda/ reports failure.
//
// Contract
// - No exceptions below the binding layer. A call that can fail returns
//   Status (or StatusOr<T>); the pybind11 layer maps codes to Python
//   exceptions through one table (python/src/status_to_exception.h).
// - Codes are few and mean one thing each. Every public function that returns
//   a Status documents which codes it may return and which it never returns.
//     kOk                 success
//     kNotFound           the key/chunk is absent (a miss, not an error)
//     kAlreadyExists      insert of a key that is already present
//     kInvalidArgument    caller error: bad shape, size, config value
//     kResourceExhausted  capacity reached (index full, no memory, disk full)
//     kFailedPrecondition the object is in the wrong state (still being
//                         written, pinned, closed)
//     kUnavailable        transient: retry later (queue full, remote down)
//     kDataLoss           stored bytes failed their checksum / fingerprint
//     kIoError            the OS or a device reported an error
//     kNotImplemented     the capability is absent on this build/device
//     kInternal           a broken invariant; always a bug
// - Status is cheap to return on the fast path: kOk carries no allocation.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <variant>

namespace kvtier {

enum class StatusCode : uint8_t {
  kOk = 0,
  kNotFound,
  kAlreadyExists,
  kInvalidArgument,
  kResourceExhausted,
  kFailedPrecondition,
  kUnavailable,
  kDataLoss,
  kIoError,
  kNotImplemented,
  kInternal,
};

std::string_view StatusCodeName(StatusCode code);

class [[nodiscard]] Status {
 public:
  Status() = default;  // kOk
  Status(StatusCode code, std::string message);

  static Status Ok() { return Status(); }

  bool ok() const { return rep_ == nullptr; }
  StatusCode code() const { return rep_ ? rep_->code : StatusCode::kOk; }
  // Empty for kOk.
  std::string_view message() const {
    return rep_ ? std::string_view(rep_->message) : std::string_view();
  }
  // "CODE: message", or "OK".
  std::string ToString() const;

  // Prefix the message with context, keeping the code: "ctx: message".
  Status Annotate(std::string_view context) const;

  friend bool operator==(const Status& a, const Status& b) {
    return a.code() == b.code() && a.message() == b.message();
  }

 private:
  struct Rep {
    StatusCode code;
    std::string message;
  };
  // Shared so that copying an error on a slow path is cheap; OK is null.
  std::shared_ptr<const Rep> rep_;
};

inline Status NotFound(std::string m) { return {StatusCode::kNotFound, std::move(m)}; }
inline Status AlreadyExists(std::string m) { return {StatusCode::kAlreadyExists, std::move(m)}; }
inline Status InvalidArgument(std::string m) { return {StatusCode::kInvalidArgument, std::move(m)}; }
inline Status ResourceExhausted(std::string m) { return {StatusCode::kResourceExhausted, std::move(m)}; }
inline Status FailedPrecondition(std::string m) { return {StatusCode::kFailedPrecondition, std::move(m)}; }
inline Status Unavailable(std::string m) { return {StatusCode::kUnavailable, std::move(m)}; }
inline Status DataLoss(std::string m) { return {StatusCode::kDataLoss, std::move(m)}; }
inline Status IoError(std::string m) { return {StatusCode::kIoError, std::move(m)}; }
inline Status NotImplemented(std::string m) { return {StatusCode::kNotImplemented, std::move(m)}; }
inline Status Internal(std::string m) { return {StatusCode::kInternal, std::move(m)}; }

// IoError carrying strerror(err) and the operation that failed.
Status ErrnoError(std::string_view op, int err);

// Either a value or a non-OK Status.
template <typename T>
class [[nodiscard]] StatusOr {
 public:
  StatusOr(Status s) : v_(std::move(s)) {  // NOLINT: implicit by design
    if (std::get<Status>(v_).ok()) v_ = Status(StatusCode::kInternal, "StatusOr built from OK status");
  }
  StatusOr(T value) : v_(std::move(value)) {}  // NOLINT: implicit by design

  bool ok() const { return std::holds_alternative<T>(v_); }
  Status status() const { return ok() ? Status() : std::get<Status>(v_); }

  T& value() & { return std::get<T>(v_); }
  const T& value() const& { return std::get<T>(v_); }
  T&& value() && { return std::get<T>(std::move(v_)); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }

 private:
  std::variant<Status, T> v_;
};

}  // namespace kvtier

#define KVT_CONCAT_INNER_(a, b) a##b
#define KVT_CONCAT_(a, b) KVT_CONCAT_INNER_(a, b)

#define KVT_RETURN_IF_ERROR(expr)                 \
  do {                                            \
    ::kvtier::Status kvt_status_ = (expr);        \
    if (!kvt_status_.ok()) return kvt_status_;    \
  } while (0)

#define KVT_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                              \
  if (!tmp.ok()) return tmp.status();             \
  lhs = std::move(tmp).value()

#define KVT_ASSIGN_OR_RETURN(lhs, expr) \
  KVT_ASSIGN_OR_RETURN_IMPL_(KVT_CONCAT_(kvt_statusor_, __LINE__), lhs, expr)
