#include "engine/stop_matcher.h"

#include <gtest/gtest.h>

namespace loraplex::engine {
namespace {

// Feeds deltas and returns everything sent, plus whether a stop string matched.
std::pair<std::string, bool> Feed(std::vector<std::string> stops, std::vector<std::string> deltas) {
  StopMatcher m(std::move(stops));
  std::string sent;
  for (const std::string& d : deltas) {
    StopMatcher::Result r = m.Push(d);
    sent += r.text;
    if (r.stopped) return {sent, true};
  }
  return {sent + m.Flush(), false};
}

TEST(StopMatcherTest, NoStopsPassesEverything) {
  StopMatcher m({});
  EXPECT_EQ(m.Push("Hello").text, "Hello");
  EXPECT_EQ(m.Push(" world").text, " world");
  EXPECT_EQ(m.Flush(), "");
}

TEST(StopMatcherTest, CutsBeforeTheStopString) {
  EXPECT_EQ(Feed({"END"}, {"abc", "xENDyz"}), std::make_pair(std::string("abcx"), true));
}

TEST(StopMatcherTest, StopStringSplitOverDeltasIsHeldBackThenCut) {
  StopMatcher m({"\n\n"});
  EXPECT_EQ(m.Push("one\n").text, "one");  // "\n" could start the stop string
  StopMatcher::Result r = m.Push("\ntwo");
  EXPECT_TRUE(r.stopped);
  EXPECT_EQ(r.text, "");
  EXPECT_EQ(m.Push("more").text, "");  // nothing after a match
}

TEST(StopMatcherTest, HeldTextIsReleasedWhenItTurnsOutNotToMatch) {
  StopMatcher m({"Lily"});
  EXPECT_EQ(m.Push("named Li").text, "named ");
  EXPECT_EQ(m.Push("sa").text, "Lisa");
  EXPECT_EQ(m.Push(" Li").text, " ");
  EXPECT_EQ(m.Flush(), "Li");  // generation ended for another reason
}

TEST(StopMatcherTest, EarliestOfSeveralStopsWins) {
  EXPECT_EQ(Feed({"park", "play"}, {"to play in the park"}),
            std::make_pair(std::string("to "), true));
}

TEST(StopMatcherTest, MultiByteStopAndText) {
  // "é" is two bytes; the held-back part starts on a character boundary.
  EXPECT_EQ(Feed({"été"}, {"un ", "ét", "é chaud"}), std::make_pair(std::string("un "), true));
  EXPECT_EQ(Feed({"été"}, {"un ", "ét", "oile"}), std::make_pair(std::string("un étoile"), false));
}

TEST(StopMatcherTest, EmptyStopStringsAreIgnored) {
  EXPECT_EQ(Feed({""}, {"abc"}), std::make_pair(std::string("abc"), false));
}

}  // namespace
}  // namespace loraplex::engine
