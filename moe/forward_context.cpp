// ForwardContext's site records (see forward_context.h).
#include "moe/forward_context.h"

namespace mole::moe {

void ForwardContext::record(SiteRecord record) {
  for (SiteRecord& existing : sites) {
    if (existing.site == record.site) {
      existing = std::move(record);
      return;
    }
  }
  sites.push_back(std::move(record));
}

}  // namespace mole::moe
