"""Texts of the development sets: references for the real recordings, and prose for the synthetic voices.

DEVELOPMENT ONLY: nothing here may be used for training, profiling or any other fitting step. The prose
passages were written for this development set (released with the project; none of it comes from licence texts,
READMEs or docstrings, the sources of scripts/bundled_model/corpus.py).
"""

from __future__ import annotations

# ------------------------------------------------------------------------------------------------ real recordings

# two_cities.wav (moonshine-voice 0.0.4): the opening sentence of Charles Dickens, "A Tale of Two Cities" (1859,
# public domain), read in full (44.4 s). Checked against Whisper base and tiny.en on five different cuts: both read
# every word of the canonical text (one cut starting mid-sentence gave "a season" once in base; the other cuts and
# tiny.en hear "the season", as printed).
TWO_CITIES_PARTS = (
    # (cut start s, cut end s, reference). Cuts sit in pauses found by an energy threshold (20.46-21.25 s).
    (
        0.0,
        20.85,
        "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, it "
        "was the season of Darkness, it was the spring of hope, it was the winter of despair,",
    ),
    (
        20.85,
        None,
        "we had everything before us, we had nothing before us, we were all going direct to Heaven, we were all "
        "going direct the other way, in short, the period was so far like the present period, that some of its "
        "noisiest authorities insisted on its being received, for good or for evil, in the superlative degree of "
        "comparison only.",
    ),
)
# Alternative cut points of the same recording (a second look at boundary effects; overlaps the parts above).
TWO_CITIES_ALT_CUTS = (
    # (start s, end s, first word, end word): a slice of the joined reference's words. Checked with tiny.en.
    (0.0, 24.33, 0, 70),  # ... we had nothing before us,
    (24.33, None, 70, None),  # we were all going direct to Heaven, ...
    (6.43, 29.77, 18, 87),  # it was the age of foolishness, ... in short,
    (10.53, 32.51, 30, 96),  # it was the epoch of incredulity, ... like the present period,
)

# beckett.wav (moonshine-voice 0.0.4, 10.0 s): Samuel Beckett, "Worstward Ho" (1983), the well-known six-sentence
# quotation. Whisper tiny.en hears exactly this; Whisper base hears "Never tried" for the first word (a model error:
# the quotation and tiny.en agree on "Ever").
BECKETT = "Ever tried. Ever failed. No matter. Try again. Fail again. Fail better."

# /usr/share/sounds/alsa/*.wav from Debian's alsa-utils (GPL-2+; human speaker test announcements). Noise.wav is
# pink noise without speech and is left out.
ALSA_SOUNDS = {
    "Front_Center": "Front center",
    "Front_Left": "Front left",
    "Front_Right": "Front right",
    "Rear_Center": "Rear center",
    "Rear_Left": "Rear left",
    "Rear_Right": "Rear right",
    "Side_Left": "Side left",
    "Side_Right": "Side right",
}

# --------------------------------------------------------------------------------------------- synthetic speech

# Each passage is a list of sentences; a clip takes sentences from the start of a passage while the clip stays
# under the length limit. Plain words only: no digits, abbreviations or symbols, so the reference is exactly what the
# synthesizer says.
PASSAGES: tuple[tuple[str, ...], ...] = (
    (
        "The lighthouse keeper climbed the spiral stairs every evening just before the sun went down.",
        "He carried a small tin of oil, a clean rag, and a notebook with a faded green cover.",
        "From the top he could see the fishing boats coming home in a long uneven line.",
        "Some nights the wind pushed so hard against the glass that the whole tower seemed to hum.",
        "He wrote down the weather, the ships he counted, and anything strange he noticed on the water.",
        "Once he saw a whale surface so close to the rocks that he dropped his pencil.",
        "Nobody believed him in the village, but he kept the page and showed it to his grandchildren.",
        "When the light was finally automated, he walked down the stairs for the last time and did not look back.",
    ),
    (
        "Good bread asks for very little, but it asks for patience above everything else.",
        "You mix flour, water, salt and a spoonful of starter, and then you simply wait.",
        "During the first few hours the dough looks lazy and nothing seems to happen at all.",
        "Slowly it grows soft and airy, and a sour, pleasant smell fills the kitchen.",
        "Folding the dough every half hour gives it strength without any hard kneading.",
        "The oven should be as hot as it can get before the loaf goes in.",
        "A heavy pot with a lid traps the steam and lets the crust turn deep brown and crackly.",
        "The hardest part of the whole process is letting the bread cool before you cut it.",
    ),
    (
        "Every autumn the geese gather on the lake behind the old mill and argue loudly for days.",
        "Then one cold morning they rise together and form a long ragged arrow across the sky.",
        "Scientists believe the birds use the sun, the stars and even the smell of the land to find their way.",
        "Young geese learn the route by following their parents the whole distance south.",
        "They rest on rivers and flooded fields, eating grain that the harvest machines left behind.",
        "Flying in a chain saves energy, because each bird rides the air stirred up by the one in front.",
        "The leader drops back when it grows tired, and another bird quietly takes its place.",
        "By the time the first snow falls here, the lake is silent and the mill pond freezes over.",
    ),
    (
        "The little mountain railway was built more than a century ago by farmers who were tired of walking.",
        "Its narrow track winds through pine forest, over two stone bridges and along the edge of a steep gorge.",
        "The engine is painted red and blows a whistle that echoes from one valley wall to the other.",
        "In summer the carriages fill with hikers carrying maps, sandwiches and heavy boots.",
        "In winter only a few passengers ride, mostly teachers and shopkeepers from the upper village.",
        "The driver knows almost everyone by name and sometimes stops to pick up a parcel by the track.",
        "At the top station there is a wooden cafe that serves hot soup and thick slices of cake.",
        "On a clear day you can see three lakes shining below like pieces of a broken mirror.",
    ),
    (
        "After the last visitor leaves, the city library becomes a very different place.",
        "The cleaners push their carts slowly between the shelves, humming songs from the radio.",
        "A night guard walks the corridors with a torch, checking that every window is closed.",
        "In the reading room the green lamps are switched off one by one until only the moonlight remains.",
        "Some people say the building creaks and sighs as the heating pipes begin to cool.",
        "The guard claims he once heard pages turning in the empty history section.",
        "He went to look and found only a window left open and a newspaper moving in the draft.",
        "Still, he always says good night to the books before he locks the heavy front door.",
    ),
    (
        "A glacier looks perfectly still, but it is really a river of ice moving very slowly downhill.",
        "Snow that falls high on the mountain is pressed by new layers until it turns into dense blue ice.",
        "The weight of the ice makes it flow, grinding the rock beneath it into fine grey powder.",
        "That powder is carried away by meltwater and gives glacial lakes their milky turquoise colour.",
        "Deep cracks called crevasses open where the ice bends over bumps in the valley floor.",
        "Climbers cross them carefully, roped together, testing each step with a long pole.",
        "Many glaciers are shrinking quickly, and old photographs show how far their edges have retreated.",
        "Walking beside one, you can hear water trickling and ice cracking like distant gunshots.",
    ),
    (
        "My aunt kept bees at the bottom of her garden, in four white boxes beside the hedge.",
        "She moved slowly around them and spoke in a low voice, as if they were old friends.",
        "She told me that bees dislike sudden movements, strong perfume and people who are afraid.",
        "In early summer she lifted the frames out one at a time to check the honey and the young bees.",
        "The frames were heavy and golden, and the air around the hive smelled of wax and flowers.",
        "When we collected the honey, we spun the frames in a metal drum that rattled like an old car.",
        "The honey ran out of a little tap into glass jars that lined the kitchen table.",
        "Each jar tasted slightly different, depending on which flowers had bloomed that month.",
    ),
    (
        "The storm arrived faster than anyone on the small boat had expected.",
        "Within minutes the sky turned the colour of slate and the waves grew taller than the cabin roof.",
        "The captain ordered everyone to put on life jackets and stay low in the middle of the deck.",
        "Rain hammered down so hard that it was impossible to tell where the sea ended and the sky began.",
        "A young sailor clung to the rail and tried to count the seconds between the flashes of lightning.",
        "After what felt like hours, the wind dropped and a thin strip of light appeared in the west.",
        "They reached the harbour soaked and exhausted, but nobody had been hurt.",
        "That night they sat in the tavern and told the story again and again, making the waves bigger every time.",
    ),
    (
        "Once a year the whole village closes the main street and fills it with long wooden tables.",
        "Families bring food from their own kitchens, and nobody is allowed to eat alone.",
        "There are pies, roasted vegetables, bowls of soup and more kinds of cake than anyone can count.",
        "A brass band plays in the square, usually a little out of tune but always very loudly.",
        "Children run between the tables with painted faces and sticky fingers.",
        "When the sun sets, lanterns are hung from the trees and the older couples begin to dance.",
        "The festival started long ago to celebrate the end of the harvest, but few people remember that now.",
        "What matters is that for one evening the neighbours share a meal and forget their quarrels.",
    ),
    (
        "The number nine bus crosses the whole city from the river docks to the hospital on the hill.",
        "Early in the morning it carries nurses, bakers and cleaners who start work before dawn.",
        "Later come the students with headphones and the office workers reading the news on their phones.",
        "In the afternoon the bus fills with schoolchildren who argue about football and homework.",
        "The driver has seen almost everything, from lost dogs to a man carrying a live chicken in a basket.",
        "She says the best part of the job is the moment the bus climbs the hill and the city opens below.",
        "On rainy days the windows steam up and passengers draw little faces on the glass.",
        "When her shift ends she takes a different bus home, just to see a different part of town.",
    ),
    (
        "In a narrow workshop near the cathedral, an old man has been making violins for fifty years.",
        "He chooses spruce for the top and maple for the back, and he lets the wood dry for a decade.",
        "Each instrument takes him about two months, most of it spent carving and scraping by hand.",
        "He taps the wooden plates with his knuckle and listens carefully to the note they make.",
        "If the sound is too dull he shaves away a little more, sometimes less than the thickness of a hair.",
        "The varnish is his own recipe, and he refuses to tell anyone what goes into it.",
        "Musicians travel from far away to try his violins, playing scales in the dusty front room.",
        "He says a violin is never really finished until someone has played it for many years.",
    ),
    (
        "Twice a day the sea pulls back from the bay and leaves a wide plain of wet sand.",
        "The tide is caused mostly by the moon, whose gravity tugs the oceans into a gentle bulge.",
        "When the sun and the moon line up, the tides are stronger and the water retreats even farther.",
        "People walk out with buckets to gather cockles, always watching the line of the returning sea.",
        "The water comes back faster than it seems, sometimes faster than a person can walk.",
        "Local guides know the safe paths and the soft patches where a boot can sink up to the knee.",
        "Birds follow the edge of the tide, pecking at worms and tiny crabs in the shallow pools.",
        "By evening the bay is full again, and the boats that lay on their sides are floating once more.",
    ),
    (
        "In autumn the garden becomes untidy, and I have learned to like it that way.",
        "The sunflowers bend their heavy heads toward the ground, and the finches pick out the seeds.",
        "Fallen leaves gather under the hedge, where hedgehogs and beetles shelter through the winter.",
        "I still pull the last carrots and dig up the potatoes before the first hard frost.",
        "The apples that are too bruised to keep go into a big pot of sauce with cinnamon and sugar.",
        "On misty mornings the spider webs between the stalks are strung with tiny drops of water.",
        "My neighbour thinks I should cut everything back and leave the beds bare and neat.",
        "I tell her the garden is only resting, and that the birds would disagree with her.",
    ),
    (
        "Far from any town, the desert sky at night is crowded with more stars than most people ever see.",
        "The air cools quickly after sunset, and the sand gives back the heat it stored during the day.",
        "Our guide lit a small fire of dry branches and made sweet tea in a battered metal pot.",
        "He pointed out the constellations and told us the names his grandfather had used for them.",
        "The band of the galaxy stretched from one horizon to the other like a cloud of silver dust.",
        "Every few minutes a shooting star scratched a bright line across the darkness.",
        "We lay on blankets and talked less and less, until nobody was talking at all.",
        "Before dawn the cold woke us, and the stars faded one by one as the sky turned pale.",
    ),
    (
        "My grandmother wrote letters long after everyone else had stopped writing them.",
        "She used thin blue paper and a fountain pen, and her handwriting leaned slightly to the right.",
        "Her letters were full of small news about the weather, the neighbours and the price of eggs.",
        "She always asked whether I was eating properly and whether I had a warm enough coat.",
        "Sometimes she pressed a flower between the pages, and it fell out when I unfolded them.",
        "I kept every letter in a shoebox under my bed, tied together with kitchen string.",
        "Years later I read them all again and heard her voice as clearly as if she were in the room.",
        "Now I write to my own grandchildren, although they usually answer with a short message on the phone.",
    ),
    (
        "For hundreds of years the river turned the wheels of the mills that lined its banks.",
        "Millers ground wheat into flour, sawed timber into planks and pounded rags into paper.",
        "Each mill had a pond above it, where water was stored and released through a wooden gate.",
        "The sound of the turning wheel could be heard across the fields on a quiet morning.",
        "When steam engines arrived, most of the mills fell silent and their wheels began to rot.",
        "A few have been restored by volunteers who spend their weekends repairing gears and paddles.",
        "Visitors can now buy a small bag of flour ground exactly as it was long ago.",
        "The river itself has not changed much, and the trout still rest in the shadow of the old walls.",
    ),
    (
        "The chess club meets on Tuesday evenings in the back room of the community hall.",
        "Its members range from a shy boy of ten to a retired engineer who has played for seventy years.",
        "They set up the boards in silence, and the only sounds are the clock buttons and the rain outside.",
        "The engineer likes slow careful games and rarely makes a move without thinking for several minutes.",
        "The boy plays quickly and boldly, throwing his pieces forward as if he were leading a cavalry charge.",
        "When they face each other, the whole room gathers around to watch.",
        "Usually the old man wins, but lately the boy has begun to surprise him.",
        "Afterwards they drink orange juice together and replay the game, arguing happily about every mistake.",
    ),
    (
        "A coral reef looks like a garden of strange plants, but it is built by tiny animals.",
        "Each coral polyp is smaller than a fingernail and builds a hard cup of limestone around itself.",
        "Over thousands of years those cups pile up into walls, towers and enormous underwater cities.",
        "Fish of every colour dart in and out of the cracks, hiding from the larger hunters nearby.",
        "Inside the coral live microscopic algae that give it colour and help it make food from sunlight.",
        "When the sea becomes too warm, the coral expels the algae and turns a ghostly white.",
        "If the water cools again in time, the reef can recover, but repeated heat waves can kill it.",
        "Divers who saw the reefs long ago often say that today they look like faded photographs.",
    ),
    (
        "In a quiet side street there is a small museum devoted entirely to clocks.",
        "The rooms are filled with ticking, chiming and whirring, and no two clocks agree on the time.",
        "There are tall clocks in wooden cases, tiny watches and a clock shaped like a sailing ship.",
        "The oldest one has only an hour hand, because people of its time did not worry about minutes.",
        "Every morning the curator winds them all by hand, which takes her almost the whole first hour.",
        "At noon the museum becomes so noisy that visitors laugh and cover their ears.",
        "She says the clocks remind her that people have always been in a hurry.",
        "Her favourite piece is a plain kitchen clock that stopped on the day the museum first opened.",
    ),
    (
        "We drove north through the snow, following the tail lights of a truck for most of the night.",
        "The road climbed through dark forests where the branches bent under the weight of the snow.",
        "Every hour or so we stopped at a petrol station to buy coffee and stretch our stiff legs.",
        "My brother chose the music, which meant the same three albums played over and over again.",
        "Near midnight a fox crossed the road in front of us and paused to stare into the headlights.",
        "We reached the cabin just before dawn and found the key hidden under a flower pot, as promised.",
        "The stove took a long time to light, and we sat in our coats watching the flames catch.",
        "When the sun came up, the lake below the cabin was frozen and perfectly white.",
    ),
    (
        "The apple orchard on the hill belongs to a family that has farmed there for generations.",
        "At harvest time they hire pickers who climb tall ladders with canvas bags strapped to their chests.",
        "A good picker twists each apple gently so that the stem stays attached and the fruit is not bruised.",
        "The full bags are emptied into wooden crates that a tractor carries down to the barn.",
        "Some apples are sold fresh at the market, and the rest are pressed into cider.",
        "The press is an old machine that squeezes the fruit between layers of cloth and straw.",
        "The juice runs out brown and cloudy, and it smells of autumn and wet leaves.",
        "Children who help with the harvest are paid with as many apples as they can carry home.",
    ),
    (
        "Before there were telephones, letters were the only way to send news across a great distance.",
        "Riders on fast horses carried mail between towns, changing horses at stations along the road.",
        "Later the railways took over, and sorting clerks worked through the night in rattling carriages.",
        "They threw sacks of letters onto station platforms without the train ever slowing down.",
        "Postage stamps made the system simpler, because the sender paid instead of the person receiving the letter.",
        "Post offices became the heart of many small towns, where people met, gossiped and paid their bills.",
        "Today most messages travel instantly, but the postman still walks his route every morning.",
        "He says that people are always happier to see a handwritten envelope than another bill.",
    ),
    (
        "I did not learn to swim until I was almost thirty, and I was embarrassed to admit it.",
        "The first lesson took place in a pool full of small children who swam circles around me.",
        "The teacher was patient and told me to lie back and let the water hold me up.",
        "For weeks I clung to the edge and kicked my legs, feeling foolish and slightly afraid.",
        "Then one morning I pushed off and reached the other side without stopping.",
        "I stood up in the shallow end, gasping and grinning like a child.",
        "Now I swim in the sea every summer, although I still keep close to the shore.",
        "The lesson I remember most is that fear gets smaller every time you face it.",
    ),
    (
        "On warm summer evenings the meadow behind our house fills with tiny flashing lights.",
        "Fireflies are beetles that make light in their bodies through a chemical reaction.",
        "Each kind of firefly has its own pattern of flashes, like a secret code.",
        "The males flash while flying, and the females answer from the grass below.",
        "In some forests thousands of fireflies flash together at the same moment, as if on command.",
        "Bright street lights confuse them, and their numbers have fallen in many places.",
        "My children catch them gently in a jar, watch them for a few minutes and then let them go.",
        "The light they make is cold, so the jar never gets warm however brightly they glow.",
    ),
    (
        "In the attic we found an old map of the county, folded so many times that it was falling apart.",
        "It showed roads that no longer exist and villages whose names we had never heard.",
        "Someone had drawn a small cross in pencil beside a wood on the far side of the river.",
        "My sister was convinced that it marked buried treasure, and she would not let the idea go.",
        "One Saturday we packed sandwiches and cycled out to find the place.",
        "The wood was still there, although half of it had been cut down for a new road.",
        "We searched for hours and found nothing but a rusty bucket and a very angry squirrel.",
        "We never learned what the cross meant, but the map now hangs in a frame in the hallway.",
    ),
    (
        "The market opens before sunrise, when the streets are still wet from the night's rain.",
        "Farmers unload crates of tomatoes, cabbages and strawberries from the backs of their vans.",
        "The fishmonger arranges his catch on a bed of ice and shouts the prices to anyone passing.",
        "An old woman sells nothing but eggs, and she knows the name of every hen that laid them.",
        "By seven o'clock the narrow lanes between the stalls are crowded with shoppers and their baskets.",
        "The smell of fresh coffee and frying onions drifts from a small van at the corner.",
        "Bargaining is part of the fun, and regular customers always receive a little extra.",
        "By noon the stalls are packed away, and only the pigeons remain to search for crumbs.",
    ),
    (
        "The first time I saw the ocean, I was seven years old and had travelled all night by train.",
        "My father woke me just as the carriage came around a bend and the water filled the window.",
        "It was grey and enormous, and it seemed to move all at once like a living thing.",
        "At the beach I ran straight toward the waves and then ran back screaming when they chased me.",
        "We built a castle with a moat, and the tide came in and slowly swallowed it.",
        "I collected shells in my pockets until my trousers sagged with their weight.",
        "That night I could still feel the rocking of the waves when I closed my eyes.",
        "I have seen many seas since then, but none of them has looked as big as that first one.",
    ),
    (
        "The old stone bridge has crossed the river for so long that nobody knows exactly who built it.",
        "Its five arches are wide enough for the barges that once carried coal and timber downstream.",
        "During a great flood the water rose almost to the top of the arches, but the bridge held firm.",
        "Carts and horses wore deep grooves into its surface, which you can still see today.",
        "Now only walkers and cyclists cross it, because the cars use the new concrete bridge upstream.",
        "In the evening people lean on the parapet and watch the swallows skim over the water.",
        "Couples have carved their initials into the stones, and some of the carvings are very old.",
        "The town council once wanted to replace it, but the residents protested until the plan was dropped.",
    ),
)

# A short phrase that must never be part of any training or profiling corpus (used by a guard test if one exists).
DEV_SET_MARKER = "DEVELOPMENT SET ONLY: never train, profile or tune thresholds on these texts."
